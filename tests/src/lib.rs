//! End-to-end tests for tandem live in `tests/`; helper programs they start live in `src/bin/`.

//! The simulator's scenarios: the production `Session`, `Dialer` and `Engine` of tandem-crdt
//! under loss, duplication, reordering, partitions and crashes, checked against the invariants.
//!
//! - `cargo test -p tandem-sim` runs the CI-sized set (`SIM_SEEDS`, default 300).
//! - `SIM_SEED=1234 cargo test -p tandem-sim --test sim -- replay --nocapture` replays one
//!   seed; add `SIM_TRACE=1` to see every message.

#![allow(clippy::unwrap_used)]

use tandem_crdt::session::Fault;
use tandem_sim::{BOUND, Sim, line_of_three, scenario};

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    (1..=n).collect()
}

#[test]
fn random_scenarios_converge() {
    let seeds = seeds();
    let (mut sim_ms, mut writes, mut worst) = (0, 0, 0);
    for &seed in &seeds {
        match scenario(seed, Fault::None) {
            Ok(o) => {
                sim_ms += o.sim_ms;
                writes += o.writes;
                worst = worst.max(o.converged_after);
            }
            Err(e) => panic!(
                "{e}\nreplay: SIM_SEED={seed} SIM_TRACE=1 cargo test -p tandem-sim --test sim -- replay --nocapture"
            ),
        }
    }
    assert!(writes > 0);
    eprintln!(
        "{} seeds, {writes} writes, {:.2} simulated hours; slowest convergence {worst} ms after heal (bound {BOUND} ms)",
        seeds.len(),
        sim_ms as f64 / 3_600_000.0
    );
}

#[test]
fn replay() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        println!("{:?}", scenario(seed, Fault::None));
    }
}

/// Finds the first seed in `seeds` whose run the invariants reject with `fault` injected into
/// the real Session, and shows it replays: the same seed fails again the same way, and
/// passes without the fault.
fn caught(
    fault: Fault,
    seeds: std::ops::RangeInclusive<u64>,
    run: impl Fn(u64, Fault) -> Result<(), String>,
) -> String {
    let (seed, e) = seeds
        .clone()
        .find_map(|seed| run(seed, fault).err().map(|e| (seed, e)))
        .unwrap_or_else(|| panic!("{fault:?} went unnoticed in seeds {seeds:?}"));
    assert_eq!(run(seed, fault).unwrap_err(), e, "the seed replays");
    run(seed, Fault::None).unwrap_or_else(|e| panic!("seed {seed} fails without the fault: {e}"));
    eprintln!("{fault:?} caught with seed {seed}: {e}");
    e
}

fn scenario_ok(seed: u64, fault: Fault) -> Result<(), String> {
    scenario(seed, fault).map(|_| ())
}

#[test]
fn the_invariants_catch_a_session_that_does_not_relay() {
    let e = caught(Fault::NoRelay, 1..=20, line_of_three);
    assert!(e.contains("missing") || e.contains("differs"), "{e}");
}

#[test]
fn the_invariants_catch_unfiltered_pushes() {
    let e = caught(Fault::NoPushFilter, 1..=50, scenario_ok);
    assert!(e.contains("known to hold"), "{e}");
}

#[test]
fn the_invariants_catch_acking_before_storing() {
    let e = caught(Fault::AckBeforeStore, 1..=100, scenario_ok);
    assert!(e.contains("not stored"), "{e}");
}

#[test]
fn partition_matrix_every_two_three_split_of_five() {
    for mask in 0u32..32 {
        if mask.count_ones() != 2 {
            continue;
        }
        let side = move |i: usize| mask & (1 << i) != 0;
        let mut sim = Sim::new(u64::from(mask), 5, Fault::None);
        sim.loss = 0.0;
        let (left, right): (Vec<usize>, Vec<usize>) = (0..5).partition(|i| side(*i));
        sim.partition(vec![left, right]);
        for i in 0..40 {
            sim.local_write(i % 5, 2);
            let t = sim.now + 3;
            sim.run_until(t);
        }
        let t = sim.now + 500;
        sim.run_until(t);
        assert!(
            sim.check(2).is_err(),
            "split {mask:05b}: the two sides cannot agree yet"
        );
        sim.check_safety().unwrap();
        sim.heal();
        let t = sim.now + BOUND;
        sim.run_until(t);
        sim.check(2)
            .unwrap_or_else(|e| panic!("split {mask:05b} after heal: {e}"));
    }
}

#[test]
fn a_crashed_node_is_replaced_without_waiting_for_the_idle_timeout() {
    let mut sim = Sim::new(7, 2, Fault::None);
    sim.loss = 0.0;
    sim.run_until(100);
    assert!(sim.connected(0, 1));
    sim.local_write(0, 1);
    sim.run_until(200);
    sim.crash(1);
    sim.restart(1);
    sim.local_write(0, 1);
    // Node 1 redials at once; node 0 still holds the dead connection, and replaces it.
    sim.run_until(260);
    assert!(sim.connected(0, 1));
    sim.run_until(400);
    sim.check(1).unwrap();
}

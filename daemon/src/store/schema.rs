//! The SQLite schema and its migrations, keyed on `PRAGMA user_version`. Each migration runs in
//! its own transaction; a database newer than this build is refused rather than guessed at.

use rusqlite::Connection;

use super::StoreError;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 6;

/// Migrations in order: index `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;

    -- Every delta this node holds, from any origin. The implicit rowid orders deltas by arrival,
    -- which is what a document snapshot records as covered.
    CREATE TABLE deltas (
        origin      BLOB    NOT NULL,
        seq         INTEGER NOT NULL,
        doc         BLOB    NOT NULL,
        kind        INTEGER NOT NULL,   -- 0 = Automerge change, 1 = tombstone
        change      BLOB,
        received_at INTEGER NOT NULL,   -- unix milliseconds
        PRIMARY KEY (origin, seq)
    );
    CREATE INDEX deltas_by_doc ON deltas (doc);

    CREATE TABLE documents (
        doc             BLOB    PRIMARY KEY,
        snapshot_upto   INTEGER NOT NULL DEFAULT 0,  -- deltas with rowid <= this are in the snapshot
        pending         INTEGER NOT NULL DEFAULT 0,  -- deltas not yet folded into snapshot
        folded          INTEGER NOT NULL DEFAULT 0,  -- deltas folded into snapshot
        heads           BLOB    NOT NULL DEFAULT x'',
        size            INTEGER NOT NULL DEFAULT 0,  -- bytes to load: snapshot + pending changes
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        deleted         INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    -- Compacted documents, apart from their small, often-updated `documents` row: SQLite
    -- rewrites a whole row on UPDATE, and a snapshot in it would be rewritten on every write.
    CREATE TABLE snapshots (
        doc      BLOB PRIMARY KEY,
        snapshot BLOB NOT NULL,             -- Automerge save() of the deltas folded so far
        heads    BLOB NOT NULL              -- its Automerge heads: the clock it covers
    );

    -- The node clock: per origin a contiguous prefix and the ranges held above it.
    CREATE TABLE clock (
        origin BLOB    PRIMARY KEY,
        prefix INTEGER NOT NULL,
        extra  BLOB    NOT NULL       -- postcard Vec<(u64, u64)>
    ) WITHOUT ROWID;
    "#,
    // 1 -> 2: membership and invites.
    r#"
    CREATE TABLE members (
        node     BLOB    PRIMARY KEY,
        addrs    TEXT    NOT NULL DEFAULT '',   -- space-separated socket addresses last known
        added_at INTEGER NOT NULL,
        removed  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    CREATE TABLE invites (
        secret_hash BLOB    PRIMARY KEY,        -- SHA-256 of the secret; the secret is not stored
        expires_at  INTEGER NOT NULL,           -- unix milliseconds
        used_by     BLOB                        -- the node that redeemed it
    ) WITHOUT ROWID;
    "#,
    // 2 -> 3: members' names, as each says in its Hello.
    r#"
    ALTER TABLE members ADD COLUMN name TEXT NOT NULL DEFAULT '';
    "#,
    // 3 -> 4: deltas found damaged on disk. They leave `deltas` and the clock (so members send
    // them again) and wait here, for inspection, until a good copy replaces them.
    r#"
    CREATE TABLE damaged (
        origin   BLOB    NOT NULL,
        seq      INTEGER NOT NULL,
        doc      BLOB    NOT NULL,
        change   BLOB,                     -- the damaged bytes, as found
        found_at INTEGER NOT NULL,         -- unix milliseconds
        why      TEXT    NOT NULL,
        PRIMARY KEY (origin, seq)
    ) WITHOUT ROWID;
    CREATE INDEX damaged_by_doc ON damaged (doc);
    "#,
    // 4 -> 5: deltas are signed by their origin. NULL for deltas stored before: this node's
    // own are signed when the store opens; other origins' are kept, and not relayed.
    r#"
    ALTER TABLE deltas ADD COLUMN prev BLOB;   -- chain hash of the origin's previous delta
    ALTER TABLE deltas ADD COLUMN sig  BLOB;   -- the origin's Ed25519 signature
    "#,
    // 5 -> 6: membership is replicated with Raft. The log and Raft's state (vote, state
    // machine: the member list, snapshot) get tables of their own. The old, local member list
    // is kept as `legacy_members` for reference only: it no longer admits anyone (the node
    // founds a one-member cluster; old members are invited again). Where members were last
    // reached stays local, in `peer_addrs` (a hint for dialing, not trust).
    r#"
    CREATE TABLE raft_log (
        idx   INTEGER PRIMARY KEY,
        entry BLOB    NOT NULL          -- postcard of the openraft entry
    );
    CREATE TABLE raft_state (
        key   TEXT PRIMARY KEY,         -- vote, committed, purged, sm, snapshot, raft_id, trusted
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    ALTER TABLE members RENAME TO legacy_members;
    CREATE TABLE peer_addrs (
        node  BLOB PRIMARY KEY,
        addrs TEXT NOT NULL             -- space-separated, where it was last reached first
    ) WITHOUT ROWID;
    INSERT INTO peer_addrs (node, addrs) SELECT node, addrs FROM legacy_members WHERE removed = 0;
    "#,
];

/// Brings the database to [`SCHEMA_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
        tracing::debug!(from, to = from + 1, "migrated schema");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn migrates_forward_keeping_rows_and_refuses_newer() {
        let mut conn = Connection::open_in_memory().unwrap();
        // A version-2 database with a member in it.
        for (i, sql) in MIGRATIONS.iter().take(2).enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", i as i64 + 1)
                .unwrap();
        }
        conn.execute(
            "INSERT INTO members (node, addrs, added_at) VALUES (x'01', '127.0.0.1:1', 5)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let (addrs, name): (String, String) = conn
            .query_row("SELECT addrs, name FROM legacy_members", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((addrs.as_str(), name.as_str()), ("127.0.0.1:1", ""));
        let hint: String = conn
            .query_row("SELECT addrs FROM peer_addrs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            hint, "127.0.0.1:1",
            "where it was reached stays a dialing hint"
        );
        migrate(&mut conn).unwrap(); // idempotent
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(migrate(&mut conn), Err(StoreError::TooNew { .. })));
    }
}

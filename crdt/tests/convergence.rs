//! Convergence: 3 to 5 replicas edit several documents at random (map puts, list inserts and
//! deletes, text splices); deltas reach replicas in random order with duplicates, through the
//! engine; a final catch-up between every pair fills what random delivery missed. Every replica
//! must end with identical heads and identical JSON for every document, and identical clocks.

#![allow(clippy::unwrap_used)]
use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc};
use proptest::prelude::*;
use tandem_crdt::{
    Action, DeltaBody, DocId, Engine, Input, MemStore, NodeId, VersionVector, actor_id, json,
};

#[derive(Debug, Clone)]
enum Op {
    MapPut { key: u8, value: i64 },
    ListInsert { at: u16, value: i64 },
    ListDelete { at: u16 },
    TextSplice { at: u16, del: u8, text: String },
}

#[derive(Debug, Clone)]
enum Step {
    Edit {
        replica: usize,
        doc: usize,
        op: Op,
    },
    Deliver {
        replica: usize,
        pick: usize,
        dup: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, any::<i64>()).prop_map(|(key, value)| Op::MapPut { key, value }),
        (any::<u16>(), any::<i64>()).prop_map(|(at, value)| Op::ListInsert { at, value }),
        any::<u16>().prop_map(|at| Op::ListDelete { at }),
        (any::<u16>(), 0u8..4, "[a-zé ]{0,4}").prop_map(|(at, del, text)| Op::TextSplice {
            at,
            del,
            text
        }),
    ]
}

fn steps(replicas: usize, docs: usize) -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            3 => (0..replicas, 0..docs, op()).prop_map(|(replica, doc, op)| Step::Edit { replica, doc, op }),
            2 => (0..replicas, any::<usize>(), any::<bool>()).prop_map(|(replica, pick, dup)| Step::Deliver { replica, pick, dup }),
        ],
        1..80,
    )
}

struct Replica {
    engine: Engine,
    store: MemStore,
    docs: BTreeMap<DocId, Automerge>,
    actor: automerge::ActorId,
}

impl Replica {
    fn new(i: usize) -> Self {
        let signer = std::sync::Arc::new(tandem_crdt::Signer::from_seed([i as u8 + 1; 32]));
        let id = signer.id();
        Self {
            engine: Engine::new(signer, VersionVector::new()),
            store: MemStore::new(),
            docs: BTreeMap::new(),
            actor: actor_id(&id, 0),
        }
    }

    fn doc(&mut self, id: DocId) -> &mut Automerge {
        let actor = self.actor.clone();
        self.docs
            .entry(id)
            .or_insert_with(|| Automerge::new().with_actor(actor))
    }

    /// Applies a local edit and returns the delta the engine made of it, if anything changed.
    fn edit(&mut self, doc_id: DocId, op: &Op) -> Option<tandem_crdt::Delta> {
        let doc = self.doc(doc_id);
        let mut tx = doc.transaction();
        let list = match tx.get(ROOT, "list").unwrap() {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            _ => tx.put_object(ROOT, "list", ObjType::List).unwrap(),
        };
        let text = match tx.get(ROOT, "text").unwrap() {
            Some((automerge::Value::Object(ObjType::Text), id)) => id,
            _ => tx.put_object(ROOT, "text", ObjType::Text).unwrap(),
        };
        match op {
            Op::MapPut { key, value } => tx.put(ROOT, format!("k{key}"), *value).unwrap(),
            Op::ListInsert { at, value } => {
                let len = tx.length(&list);
                tx.insert(&list, usize::from(*at) % (len + 1), *value)
                    .unwrap();
            }
            Op::ListDelete { at } => {
                let len = tx.length(&list);
                if len > 0 {
                    tx.delete(&list, usize::from(*at) % len).unwrap();
                }
            }
            Op::TextSplice { at, del, text: s } => {
                let len = tx.length(&text);
                let pos = usize::from(*at) % (len + 1);
                let del = usize::from(*del).min(len - pos);
                tx.splice_text(&text, pos, del as isize, s).unwrap();
            }
        }
        tx.commit();
        let change = doc.get_last_local_change()?;
        let body = DeltaBody::Change(change.raw_bytes().to_vec());
        let actions = self.engine.handle(Input::LocalChange { doc: doc_id, body });
        let mut made = None;
        for a in actions {
            if let Action::Persist { deltas, .. } = a {
                self.store.insert(deltas.clone());
                made = deltas.into_iter().next();
            }
        }
        made
    }

    fn receive(&mut self, from: NodeId, deltas: Vec<tandem_crdt::Delta>) {
        for a in self.engine.handle(Input::RemoteDeltas { from, deltas }) {
            match a {
                Action::Persist { deltas, .. } => {
                    self.store.insert(deltas.clone());
                    for d in deltas {
                        let change = d.validate().unwrap().unwrap();
                        self.doc(d.doc).apply_changes([change]).unwrap();
                    }
                }
                Action::Reject { error, .. } => panic!("valid delta rejected: {error}"),
            }
        }
    }
}

fn run(
    replicas: usize,
    docs: usize,
    steps: Vec<Step>,
    batch_bytes: usize,
) -> Result<(), TestCaseError> {
    let doc_ids: Vec<DocId> = (0..docs)
        .map(|i| DocId::from_bytes([i as u8; 16]))
        .collect();
    let mut nodes: Vec<Replica> = (0..replicas).map(Replica::new).collect();
    let mut pool = Vec::new();
    for step in steps {
        match step {
            Step::Edit { replica, doc, op } => {
                if let Some(d) = nodes[replica].edit(doc_ids[doc], &op) {
                    pool.push(d);
                }
            }
            Step::Deliver { replica, pick, dup } => {
                if pool.is_empty() {
                    continue;
                }
                let d = pool[pick % pool.len()].clone();
                let from = d.id.origin;
                let deltas = if dup { vec![d.clone(), d] } else { vec![d] };
                nodes[replica].receive(from, deltas);
            }
        }
    }
    // Anti-entropy: every pair runs catch-up both ways until nothing moves.
    for _ in 0..2 {
        for a in 0..replicas {
            for b in 0..replicas {
                if a == b {
                    continue;
                }
                let peer_clock = nodes[b].engine.clock().clone();
                let mut plan = nodes[a].engine.catch_up(&peer_clock);
                let from = nodes[a].engine.node_id();
                while let Some(batch) = plan.next_batch(&nodes[a].store, batch_bytes).unwrap() {
                    nodes[b].receive(from, batch);
                }
            }
        }
    }
    let clock0 = nodes[0].engine.clock().clone();
    for (i, n) in nodes.iter().enumerate() {
        prop_assert_eq!(n.engine.clock(), &clock0, "clock of replica {}", i);
        prop_assert_eq!(
            &n.store.clock(),
            &clock0,
            "store of replica {} matches its clock",
            i
        );
    }
    for id in &doc_ids {
        let states: Vec<_> = nodes
            .iter_mut()
            .map(|n| {
                let d = n.doc(*id);
                (d.get_heads(), json::object_to_json(d, &ROOT))
            })
            .collect();
        for s in &states[1..] {
            prop_assert_eq!(&s.0, &states[0].0, "heads of {}", id);
            prop_assert_eq!(&s.1, &states[0].1, "json of {}", id);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge(
        (replicas, docs, steps) in (3usize..=5, 1usize..=4).prop_flat_map(|(r, d)| (Just(r), Just(d), steps(r, d))),
        batch_bytes in 64usize..4096,
    ) {
        run(replicas, docs, steps, batch_bytes)?;
    }
}

//! The store over a real redb file, and routing between two shards' stores.

use std::rc::Rc;

use super::*;
use crate::clock::ManualClock;

fn run<F: std::future::Future<Output = ()> + 'static>(f: F) {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .ring_depth(64)
        .make()
        .expect("executor");
    ex.run(f);
}

fn entry(tenant: Option<&str>, rcpt: &str, reason: Reason) -> Entry {
    Entry {
        tenant: tenant.map(str::to_owned),
        rcpt: rcpt.to_owned(),
        reason,
        note: None,
        added_ms: 7,
    }
}

#[test]
fn addresses_are_normalized_and_checked() {
    assert_eq!(
        normalize(" <Bob@Example.COM> ").as_deref(),
        Ok("bob@example.com")
    );
    assert!(normalize("no-at-sign").is_err());
    assert!(normalize("@example.com").is_err());
    assert!(normalize("a b@example.com").is_err());
    assert!(normalize(&format!("{}@x.test", "a".repeat(300))).is_err());
}

#[test]
fn entries_survive_a_reopen_per_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    run(async move {
        let store = Store::open(&path).expect("open");
        assert!(store
            .add(&entry(None, "a@x.test", Reason::Bounce))
            .await
            .expect("add"));
        assert!(!store
            .add(&entry(None, "a@x.test", Reason::Complaint))
            .await
            .expect("add again"));
        assert!(store
            .add(&entry(Some("acme"), "b@x.test", Reason::Complaint))
            .await
            .expect("add tenant"));
        assert!(store
            .add(&entry(None, "c@x.test", Reason::Admin))
            .await
            .expect("c"));
        assert!(store.remove(None, "c@x.test").await.expect("remove"));
        assert!(!store.remove(None, "c@x.test").await.expect("remove again"));
        assert!(store.contains(None, "a@x.test"));
        assert!(
            !store.contains(Some("acme"), "a@x.test"),
            "lists are per tenant"
        );
        assert!(store.contains(Some("acme"), "b@x.test"));
        assert!(!store.contains(None, "b@x.test"));
        drop(store);

        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.len(), 2);
        assert!(store.contains(None, "a@x.test"));
        assert!(store.contains(Some("acme"), "b@x.test"));
        assert!(
            !store.contains(None, "c@x.test"),
            "the removal is durable too"
        );
        let default = store.list(None, 10);
        assert_eq!(default.len(), 1);
        assert_eq!(default[0].reason, Reason::Bounce, "the first reason stays");
        assert_eq!(store.list(Some("acme"), 10)[0].rcpt, "b@x.test");
        assert_eq!(store.list(Some("*"), 10).len(), 2);
        assert_eq!(store.list(Some("*"), 1).len(), 1);
    });
}

/// Two shards in one executor, the remote being the other's `serve`.
struct Loopback(std::cell::RefCell<Vec<Rc<Suppression>>>);

impl Remote for Loopback {
    fn ask(&self, to: usize, q: Request) -> LocalFuture<'_, Result<Response, SuppressionError>> {
        let target = self.0.borrow().get(to).cloned();
        Box::pin(async move {
            match target {
                Some(s) => s.serve(q).await,
                None => Err(SuppressionError::Peer(to)),
            }
        })
    }
}

#[test]
fn entries_live_with_the_owner_of_their_domain() {
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let paths: Vec<_> = dirs.iter().map(|d| d.path().to_owned()).collect();
    run(async move {
        let clock: Rc<dyn crate::clock::Clock> = Rc::new(ManualClock::new(1_000));
        let shards: Vec<Rc<Suppression>> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Rc::new(Suppression::new(
                    i,
                    2,
                    Rc::new(Store::open(p).expect("open")),
                    Observers::default(),
                    clock.clone(),
                ))
            })
            .collect();
        let remote = Rc::new(Loopback(std::cell::RefCell::new(shards.clone())));
        for s in &shards {
            s.set_remote(remote.clone());
        }
        // Two domains owned by different shards.
        let domains: Vec<String> = (0..50).map(|i| format!("d{i}.test")).collect();
        let on0 = domains
            .iter()
            .find(|d| shards::shard_of(d, 2) == 0)
            .expect("a domain of shard 0");
        let on1 = domains
            .iter()
            .find(|d| shards::shard_of(d, 2) == 1)
            .expect("a domain of shard 1");
        let (a, b) = (format!("a@{on0}"), format!("B@{on1}"));
        // Added through shard 0: each lands at its owner.
        assert!(shards[0]
            .add(None, &a, Reason::Bounce, None)
            .await
            .expect("a"));
        assert!(shards[0]
            .add(None, &b, Reason::Complaint, Some("from a test"))
            .await
            .expect("b"));
        assert!(shards[0].store().contains(None, &a));
        assert!(shards[1].store().contains(None, &b.to_lowercase()));
        assert!(!shards[0].store().contains(None, &b.to_lowercase()));
        // Any shard answers a check.
        for s in &shards {
            assert!(s.check(None, &a).await);
            assert!(s.check(None, &b).await, "case ignored");
            assert!(!s.check(Some("acme"), &b).await);
            assert_eq!(
                s.check_all(None, &[&a, "x@y.test", &b]).await,
                vec![true, false, true]
            );
        }
        // List gathers every shard; remove goes to the owner.
        let listed = shards[1]
            .admin(&crate::admin::SuppressionOp::List {
                tenant: None,
                limit: None,
            })
            .await
            .expect("list");
        assert_eq!(
            listed["entries"].as_array().map(Vec::len),
            Some(2),
            "{listed}"
        );
        let removed = shards[1]
            .admin(&crate::admin::SuppressionOp::Remove {
                tenant: None,
                rcpt: a.clone(),
            })
            .await
            .expect("remove");
        assert_eq!(removed["removed"], true);
        assert!(!shards[1].check(None, &a).await);
        let bad = shards[0]
            .admin(&crate::admin::SuppressionOp::Add {
                tenant: None,
                rcpt: "nobody".into(),
                reason: None,
            })
            .await;
        assert!(matches!(bad, Err(SuppressionError::BadAddress(_))));
    });
}

//! What every backend must do, as one suite: the embedded store's unit test
//! and the NATS test run the same checks, so the two cannot drift apart.
//!
//! [`check`] returns the first failure as a sentence. Each run works under
//! its own function names (`prefix`), so runs against a shared server do not
//! see each other's data.

use std::sync::Arc;

use super::{Backend, KvError, Page, Quota, Scope, Usage};

const ROOMY: Quota = Quota {
    max_keys: 1_000_000,
    max_bytes: 1 << 30,
};

macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

fn failed(what: &str) -> impl Fn(KvError) -> String + '_ {
    move |error| format!("{what}: {error}")
}

/// Runs every check against `backend`.
pub async fn check<B: Backend>(backend: &Arc<B>, prefix: &str) -> Result<(), String> {
    let b = backend.as_ref();
    let scope = Scope::new(&format!("{prefix}-a"), "default");
    let other_label = Scope::new(&format!("{prefix}-a"), "sessions");
    let other_function = Scope::new(&format!("{prefix}-b"), "default");

    // Absent, then present, then overwritten, then gone.
    ensure!(
        b.get(&scope, "k").await.map_err(failed("get"))?.is_none(),
        "a new store has a key"
    );
    ensure!(
        !b.exists(&scope, "k").await.map_err(failed("exists"))?,
        "exists on an absent key"
    );
    b.set(&scope, "k", b"one".to_vec(), ROOMY)
        .await
        .map_err(failed("set"))?;
    ensure!(
        b.get(&scope, "k").await.map_err(failed("get"))? == Some(b"one".to_vec()),
        "get does not return what set stored"
    );
    ensure!(
        b.exists(&scope, "k").await.map_err(failed("exists"))?,
        "exists after set"
    );
    b.set(&scope, "k", b"two".to_vec(), ROOMY)
        .await
        .map_err(failed("overwrite"))?;
    ensure!(
        b.get(&scope, "k").await.map_err(failed("get"))? == Some(b"two".to_vec()),
        "an overwrite is not read back"
    );
    b.delete(&scope, "k").await.map_err(failed("delete"))?;
    ensure!(
        b.get(&scope, "k").await.map_err(failed("get"))?.is_none(),
        "a deleted key is read"
    );
    b.delete(&scope, "k")
        .await
        .map_err(failed("deleting an absent key"))?;

    // Values and keys of every shape come back as they went in.
    let binary: Vec<u8> = (0..=255u8).collect();
    for (key, value) in [
        ("empty", Vec::new()),
        ("binary", binary),
        ("a/b c.d*e>f:g\u{e9}", b"odd key".to_vec()),
        (".starts-with-dot", b"dot".to_vec()),
    ] {
        b.set(&scope, key, value.clone(), ROOMY)
            .await
            .map_err(failed("set"))?;
        ensure!(
            b.get(&scope, key).await.map_err(failed("get"))? == Some(value),
            "the value of {key:?} does not come back as stored"
        );
        b.delete(&scope, key).await.map_err(failed("delete"))?;
    }

    // Stores are separate by function and by label.
    b.set(&scope, "shared-name", b"a".to_vec(), ROOMY)
        .await
        .map_err(failed("set"))?;
    for other in [&other_label, &other_function] {
        ensure!(
            b.get(other, "shared-name")
                .await
                .map_err(failed("get"))?
                .is_none(),
            "{}/{} sees a key of {}/{}",
            other.function,
            other.label,
            scope.function,
            scope.label
        );
    }
    b.delete(&scope, "shared-name")
        .await
        .map_err(failed("delete"))?;

    // Listing: in order, in pages, only this store's keys.
    let mut expected: Vec<String> = (0..25).map(|i| format!("key-{i:02}")).collect();
    for key in &expected {
        b.set(&scope, key, b"v".to_vec(), ROOMY)
            .await
            .map_err(failed("set"))?;
    }
    b.set(&other_label, "key-zz", b"v".to_vec(), ROOMY)
        .await
        .map_err(failed("set"))?;
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let Page { keys, next } = b
            .list(&scope, after.as_deref(), 10)
            .await
            .map_err(failed("list"))?;
        ensure!(keys.len() <= 10, "a page of 10 held {}", keys.len());
        listed.extend(keys);
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    expected.sort();
    ensure!(listed == expected, "listing in pages gave {listed:?}");
    for key in &expected {
        b.delete(&scope, key).await.map_err(failed("delete"))?;
    }
    b.delete(&other_label, "key-zz")
        .await
        .map_err(failed("delete"))?;

    // Counters: decimal text, signed, refused when not a number or overflowing.
    ensure!(
        b.increment(&scope, "n", 5, ROOMY)
            .await
            .map_err(failed("increment"))?
            == 5,
        "5 from absent"
    );
    ensure!(
        b.increment(&scope, "n", -7, ROOMY)
            .await
            .map_err(failed("increment"))?
            == -2,
        "5 - 7"
    );
    ensure!(
        b.get(&scope, "n").await.map_err(failed("get"))? == Some(b"-2".to_vec()),
        "a counter does not read as decimal text"
    );
    b.set(&scope, "word", b"hello".to_vec(), ROOMY)
        .await
        .map_err(failed("set"))?;
    ensure!(
        matches!(
            b.increment(&scope, "word", 1, ROOMY).await,
            Err(KvError::Invalid(_))
        ),
        "incrementing a word is not refused"
    );
    b.set(&scope, "big", i64::MAX.to_string().into_bytes(), ROOMY)
        .await
        .map_err(failed("set"))?;
    ensure!(
        matches!(
            b.increment(&scope, "big", 1, ROOMY).await,
            Err(KvError::Invalid(_))
        ),
        "an overflowing increment is not refused"
    );
    ensure!(
        b.get(&scope, "big").await.map_err(failed("get"))?
            == Some(i64::MAX.to_string().into_bytes()),
        "a refused increment changed the value"
    );

    // Compare-and-swap.
    let cas = |expected: Option<&[u8]>, value: &[u8]| {
        b.compare_and_swap(
            &scope,
            "c",
            expected.map(<[u8]>::to_vec),
            value.to_vec(),
            ROOMY,
        )
    };
    ensure!(
        cas(None, b"1").await.map_err(failed("cas"))?,
        "swap on absent, expecting absent"
    );
    ensure!(
        !cas(None, b"x").await.map_err(failed("cas"))?,
        "swap on present, expecting absent"
    );
    ensure!(
        !cas(Some(b"0"), b"x").await.map_err(failed("cas"))?,
        "swap with a stale value"
    );
    ensure!(
        cas(Some(b"1"), b"2").await.map_err(failed("cas"))?,
        "swap with the current value"
    );
    ensure!(
        b.get(&scope, "c").await.map_err(failed("get"))? == Some(b"2".to_vec()),
        "a swap is not read back"
    );

    // Concurrent increments are not lost.
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let backend = Arc::clone(backend);
            let scope = scope.clone();
            tokio::spawn(async move { backend.increment(&scope, "race", 1, ROOMY).await })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| format!("increment task: {e}"))?
            .map_err(failed("increment"))?;
    }
    ensure!(
        b.get(&scope, "race").await.map_err(failed("get"))? == Some(b"40".to_vec()),
        "40 concurrent increments did not add up to 40"
    );

    // Usage, quotas, the list of stores, purge.
    b.purge(&scope).await.map_err(failed("purge"))?;
    ensure!(
        b.usage(&scope).await.map_err(failed("usage"))? == Usage::default(),
        "a purged store is not empty"
    );
    let tight = Quota {
        max_keys: 2,
        max_bytes: 20,
    };
    b.set(&scope, "a", b"12345".to_vec(), tight)
        .await
        .map_err(failed("set"))?;
    b.set(&scope, "b", b"12345".to_vec(), tight)
        .await
        .map_err(failed("set"))?;
    ensure!(
        b.usage(&scope).await.map_err(failed("usage"))? == Usage { keys: 2, bytes: 12 },
        "usage after two 6-byte entries"
    );
    ensure!(
        matches!(b.set(&scope, "c", b"1".to_vec(), tight).await, Err(KvError::Limit(m)) if m.contains("max_keys")),
        "a third key past max_keys = 2 is not refused by name"
    );
    b.set(&scope, "a", b"x".to_vec(), tight)
        .await
        .map_err(failed("an overwrite at max_keys"))?;
    ensure!(
        matches!(b.set(&scope, "b", vec![0; 20], tight).await, Err(KvError::Limit(m)) if m.contains("max_bytes")),
        "a write past max_bytes is not refused by name"
    );
    ensure!(
        matches!(
            b.increment(&scope, "n", 1, tight).await,
            Err(KvError::Limit(_))
        ),
        "an increment creating a key past max_keys is not refused"
    );
    ensure!(
        b.get(&scope, "b").await.map_err(failed("get"))? == Some(b"12345".to_vec()),
        "a refused write changed what was stored"
    );
    let lowered = Quota {
        max_keys: 1,
        max_bytes: 1,
    };
    b.set(&scope, "b", b"1".to_vec(), lowered)
        .await
        .map_err(failed("shrinking a store over a lowered limit"))?;
    ensure!(
        b.usage(&scope).await.map_err(failed("usage"))? == Usage { keys: 2, bytes: 4 },
        "usage after shrinking"
    );
    b.set(&other_label, "z", b"1".to_vec(), ROOMY)
        .await
        .map_err(failed("set"))?;
    let stores = b.stores(&scope.function).await.map_err(failed("stores"))?;
    ensure!(
        stores
            == vec![
                ("default".to_string(), Usage { keys: 2, bytes: 4 }),
                ("sessions".to_string(), Usage { keys: 1, bytes: 2 })
            ],
        "stores of the function: {stores:?}"
    );
    b.purge(&scope).await.map_err(failed("purge"))?;
    b.purge(&other_label).await.map_err(failed("purge"))?;
    ensure!(
        b.stores(&scope.function)
            .await
            .map_err(failed("stores"))?
            .is_empty(),
        "purged stores are still listed"
    );
    Ok(())
}

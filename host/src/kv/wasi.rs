//! `wasi:keyvalue` for guests, both versions in use: `0.2.0-draft`
//! (wasmtime serve, wasmCloud) and `0.2.0-draft2` (Spin 4, which adds
//! compare-and-swap and a signed increment), interfaces `store`, `atomics`
//! and `batch`. The WIT is vendored in `host/wit/`.
//!
//! Both versions' bindings are generated here over one [`KvView`], whose
//! methods do the work once: the grant check at `open` (a label the policy
//! does not list is `access-denied`, as is every label when the policy has
//! no `[keyvalue]`), the per-call limits (key and value sizes) and the
//! per-invocation count of operations, each refused with the interface's
//! `other` error naming the limit, before the backend is asked. The
//! backend's own failures (a quota, an unreachable server) come back the
//! same way: a guest sees an error it can handle, never a trap.
//!
//! The draft's `list-keys` cursor is a number; Lichen's is the count of
//! keys already listed, so any cursor a guest makes up is a valid start.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable, ResourceTableError};

use super::{Backend, Kv, KvAccess, KvError, KvMetrics, Page, Quota, Scope};
use crate::policy::Policy;
use crate::trace::Traced;

/// Keys per `list-keys` page.
const PAGE: usize = 1000;

mod draft {
    wasmtime::component::bindgen!({
        path: "wit/keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: { "wasi:keyvalue/store.bucket": super::Bucket },
        trappable_error_type: { "wasi:keyvalue/store.error" => super::Failure },
    });
}

mod draft2 {
    wasmtime::component::bindgen!({
        path: "wit/keyvalue-0.2.0-draft2",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
            "wasi:keyvalue/atomics.cas": super::Cas,
        },
        trappable_error_type: { "wasi:keyvalue/store.error" => super::Failure },
    });
}

/// An open store, as the guest holds it.
pub struct Bucket {
    scope: Scope,
}

/// A compare-and-swap in progress (draft2): the value read at its start.
pub struct Cas {
    scope: Scope,
    key: String,
    current: Option<Vec<u8>>,
}

/// The interface's error, before it is turned into either version's.
pub enum Failure {
    AccessDenied,
    Error(KvError),
}

impl From<KvError> for Failure {
    fn from(error: KvError) -> Self {
        Failure::Error(error)
    }
}

impl From<ResourceTableError> for Failure {
    fn from(error: ResourceTableError) -> Self {
        Failure::Error(KvError::Invalid(error.to_string()))
    }
}

impl Failure {
    fn limit(message: String) -> Self {
        Failure::Error(KvError::Limit(message))
    }

    /// The `outcome` label of the operation that failed so.
    fn outcome(&self) -> &'static str {
        match self {
            Failure::AccessDenied => "denied",
            Failure::Error(KvError::Limit(_)) => "limit",
            Failure::Error(KvError::Unavailable(_)) => "unavailable",
            Failure::Error(KvError::Invalid(_)) => "invalid",
        }
    }

    /// The message of the interface's `other` error.
    fn message(self) -> String {
        match self {
            Failure::AccessDenied => "access denied".to_string(),
            Failure::Error(error) => error.to_string(),
        }
    }
}

/// What one invocation may do with key-value stores, and has done.
pub struct KvCtx {
    function: Arc<str>,
    policy: Arc<Policy>,
    /// `None`: the host has no backend (an embedding without one).
    access: Option<Arc<KvAccess>>,
    /// Operations made so far.
    ops: u64,
    /// The guest call's span, when traced: each operation is a child.
    trace: Option<Traced>,
}

impl KvCtx {
    pub fn new(function: Arc<str>, policy: Arc<Policy>, access: Option<Arc<KvAccess>>) -> Self {
        KvCtx {
            function,
            policy,
            access,
            ops: 0,
            trace: None,
        }
    }

    /// The same, each operation a child span of `trace`.
    pub fn traced(mut self, trace: Option<Traced>) -> Self {
        self.trace = trace;
        self
    }

    /// Starts a new count of operations against `max_ops`.
    pub fn reset_ops(&mut self) {
        self.ops = 0;
    }

    /// Starts timing operation `op` for the metrics.
    fn op(&self, op: &'static str) -> Op {
        Op {
            op,
            started: Instant::now(),
            function: Arc::clone(&self.function),
            metrics: self.access.as_ref().map(|a| a.metrics.clone()),
            traced: self.trace.clone().map(|trace| (trace, SystemTime::now())),
        }
    }
}

/// One operation on its way: counted with its outcome when it ends.
struct Op {
    op: &'static str,
    started: Instant,
    function: Arc<str>,
    metrics: Option<KvMetrics>,
    /// The span it is a child of, and when it started.
    traced: Option<(Traced, SystemTime)>,
}

impl Op {
    fn finish<T>(self, result: Result<T, Failure>) -> Result<T, Failure> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(failure) => failure.outcome(),
        };
        if let Some(metrics) = &self.metrics {
            metrics.record(&self.function, self.op, outcome, self.started.elapsed());
        }
        if let Some((trace, started)) = &self.traced {
            trace.child_between(
                "keyvalue",
                (*started, SystemTime::now()),
                [
                    KeyValue::new("lichen.kv.op", self.op),
                    KeyValue::new("lichen.kv.outcome", outcome),
                ],
            );
        }
        result
    }
}

/// The key-value state of a store's data, borrowed for one call.
pub struct KvView<'a> {
    pub ctx: &'a mut KvCtx,
    pub table: &'a mut ResourceTable,
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// Adds both versions of `wasi:keyvalue` to `linker`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    draft::wasi::keyvalue::store::add_to_linker::<T, HasKv>(linker, view)?;
    draft::wasi::keyvalue::atomics::add_to_linker::<T, HasKv>(linker, view)?;
    draft::wasi::keyvalue::batch::add_to_linker::<T, HasKv>(linker, view)?;
    draft2::wasi::keyvalue::store::add_to_linker::<T, HasKv>(linker, view)?;
    draft2::wasi::keyvalue::atomics::add_to_linker::<T, HasKv>(linker, view)?;
    draft2::wasi::keyvalue::batch::add_to_linker::<T, HasKv>(linker, view)?;
    Ok(())
}

impl KvView<'_> {
    fn open(&mut self, label: String) -> Result<Resource<Bucket>, Failure> {
        let op = self.ctx.op("open");
        let granted = self.ctx.policy.keyvalue.stores.contains(&label);
        if !granted || self.ctx.access.is_none() {
            return op.finish(Err(Failure::AccessDenied));
        }
        let scope = Scope {
            function: Arc::clone(&self.ctx.function),
            label: Arc::from(label),
        };
        op.finish(self.table.push(Bucket { scope }).map_err(Failure::from))
    }

    /// Counts `n` operations against `max_ops` and hands out the backend.
    fn begin(&mut self, n: usize) -> Result<Arc<Kv>, Failure> {
        let max = self.ctx.policy.keyvalue.max_ops;
        self.ctx.ops = self.ctx.ops.saturating_add(n as u64);
        if self.ctx.ops > max {
            return Err(Failure::limit(format!(
                "max_ops: this invocation has used its {max} key-value operations"
            )));
        }
        self.ctx
            .access
            .as_ref()
            .map(|access| Arc::clone(&access.backend))
            .ok_or(Failure::AccessDenied)
    }

    fn scope(&self, bucket: &Resource<Bucket>) -> Result<Scope, Failure> {
        Ok(self.table.get(bucket)?.scope.clone())
    }

    /// What an operation on one key needs, checked and counted: the
    /// bucket's store and the backend.
    fn one_key(
        &mut self,
        bucket: &Resource<Bucket>,
        key: &str,
    ) -> Result<(Scope, Arc<Kv>), Failure> {
        let scope = self.scope(bucket)?;
        self.check_key(key)?;
        Ok((scope, self.begin(1)?))
    }

    fn check_key(&self, key: &str) -> Result<(), Failure> {
        let max = self.ctx.policy.keyvalue.max_key_bytes;
        if key.len() as u64 > max {
            return Err(Failure::limit(format!(
                "max_key_bytes: the key is {} bytes, over the policy's limit of {max}",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Failure> {
        let max = self.ctx.policy.keyvalue.max_value_bytes;
        if value.len() as u64 > max {
            return Err(Failure::limit(format!(
                "max_value_bytes: the value is {} bytes, over the policy's limit of {max}",
                value.len()
            )));
        }
        Ok(())
    }

    fn quota(&self) -> Quota {
        let grant = &self.ctx.policy.keyvalue;
        Quota {
            max_keys: grant.max_keys,
            max_bytes: grant.max_bytes,
        }
    }

    async fn get(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let op = self.ctx.op("get");
        op.finish(
            async {
                let (scope, backend) = self.one_key(bucket, &key)?;
                Ok(backend.get(&scope, &key).await?)
            }
            .await,
        )
    }

    async fn set(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), Failure> {
        let op = self.ctx.op("set");
        op.finish(
            async {
                self.check_value(&value)?;
                let (scope, backend) = self.one_key(bucket, &key)?;
                Ok(backend.set(&scope, &key, value, self.quota()).await?)
            }
            .await,
        )
    }

    async fn delete(&mut self, bucket: &Resource<Bucket>, key: String) -> Result<(), Failure> {
        let op = self.ctx.op("delete");
        op.finish(
            async {
                let (scope, backend) = self.one_key(bucket, &key)?;
                Ok(backend.delete(&scope, &key).await?)
            }
            .await,
        )
    }

    async fn exists(&mut self, bucket: &Resource<Bucket>, key: String) -> Result<bool, Failure> {
        let op = self.ctx.op("exists");
        op.finish(
            async {
                let (scope, backend) = self.one_key(bucket, &key)?;
                Ok(backend.exists(&scope, &key).await?)
            }
            .await,
        )
    }

    async fn list(
        &mut self,
        bucket: &Resource<Bucket>,
        after: Option<String>,
    ) -> Result<Page, Failure> {
        let op = self.ctx.op("list");
        op.finish(
            async {
                let scope = self.scope(bucket)?;
                let backend = self.begin(1)?;
                Ok(backend.list(&scope, after.as_deref(), PAGE).await?)
            }
            .await,
        )
    }

    /// The draft's numbered cursor: skip `offset` keys, then a page.
    async fn list_from(
        &mut self,
        bucket: &Resource<Bucket>,
        offset: u64,
    ) -> Result<(Vec<String>, Option<u64>), Failure> {
        let op = self.ctx.op("list");
        op.finish(
            async {
                let scope = self.scope(bucket)?;
                let backend = self.begin(1)?;
                let mut after: Option<String> = None;
                let mut skipped = 0u64;
                loop {
                    let want = usize::try_from(offset - skipped)
                        .unwrap_or(usize::MAX)
                        .min(PAGE);
                    if want == 0 {
                        break;
                    }
                    let page = backend.list(&scope, after.as_deref(), want).await?;
                    skipped += page.keys.len() as u64;
                    after = page.keys.last().cloned();
                    if page.next.is_none() {
                        return Ok((Vec::new(), None));
                    }
                }
                let page = backend.list(&scope, after.as_deref(), PAGE).await?;
                let next = page.next.as_ref().map(|_| offset + page.keys.len() as u64);
                Ok((page.keys, next))
            }
            .await,
        )
    }

    async fn increment(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Result<i64, Failure> {
        let op = self.ctx.op("increment");
        op.finish(
            async {
                let (scope, backend) = self.one_key(bucket, &key)?;
                Ok(backend.increment(&scope, &key, delta, self.quota()).await?)
            }
            .await,
        )
    }

    async fn get_many(
        &mut self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, Failure> {
        let op = self.ctx.op("get_many");
        op.finish(
            async {
                let scope = self.scope(bucket)?;
                for key in &keys {
                    self.check_key(key)?;
                }
                let backend = self.begin(keys.len())?;
                let mut found = Vec::with_capacity(keys.len());
                for key in keys {
                    let value = backend.get(&scope, &key).await?;
                    found.push(value.map(|value| (key, value)));
                }
                Ok(found)
            }
            .await,
        )
    }

    async fn set_many(
        &mut self,
        bucket: &Resource<Bucket>,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), Failure> {
        let op = self.ctx.op("set_many");
        op.finish(
            async {
                let scope = self.scope(bucket)?;
                for (key, value) in &entries {
                    self.check_key(key)?;
                    self.check_value(value)?;
                }
                let backend = self.begin(entries.len())?;
                let quota = self.quota();
                for (key, value) in entries {
                    backend.set(&scope, &key, value, quota).await?;
                }
                Ok(())
            }
            .await,
        )
    }

    async fn delete_many(
        &mut self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), Failure> {
        let op = self.ctx.op("delete_many");
        op.finish(
            async {
                let scope = self.scope(bucket)?;
                for key in &keys {
                    self.check_key(key)?;
                }
                let backend = self.begin(keys.len())?;
                for key in keys {
                    backend.delete(&scope, &key).await?;
                }
                Ok(())
            }
            .await,
        )
    }

    async fn new_cas(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
    ) -> Result<Resource<Cas>, Failure> {
        let op = self.ctx.op("cas");
        op.finish(
            async {
                let (scope, backend) = self.one_key(bucket, &key)?;
                let current = backend.get(&scope, &key).await?;
                Ok(self.table.push(Cas {
                    scope,
                    key,
                    current,
                })?)
            }
            .await,
        )
    }

    /// Swaps if nothing changed since `cas` read; otherwise hands back a
    /// fresh `cas` with what is there now, so the guest can try again.
    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> Result<Result<(), Resource<Cas>>, Failure> {
        let op = self.ctx.op("cas");
        op.finish(
            async {
                let Cas {
                    scope,
                    key,
                    current,
                } = self.table.delete(cas)?;
                self.check_value(&value)?;
                let backend = self.begin(1)?;
                if backend
                    .compare_and_swap(&scope, &key, current, value, self.quota())
                    .await?
                {
                    return Ok(Ok(()));
                }
                let current = backend.get(&scope, &key).await?;
                Ok(Err(self.table.push(Cas {
                    scope,
                    key,
                    current,
                })?))
            }
            .await,
        )
    }
}

/// The draft's counters are unsigned.
fn unsigned_delta(delta: u64) -> Result<i64, Failure> {
    i64::try_from(delta).map_err(|_| {
        Failure::Error(KvError::Invalid(format!(
            "an increment of {delta} is too large"
        )))
    })
}

fn unsigned_sum(sum: i64) -> Result<u64, Failure> {
    u64::try_from(sum).map_err(|_| {
        Failure::Error(KvError::Invalid(format!(
            "the counter is {sum}, below zero"
        )))
    })
}

macro_rules! store_and_batch {
    ($version:ident, $cursor:ty) => {
        const _: () = {
            use $version::wasi::keyvalue::{batch, store};

            impl store::Host for KvView<'_> {
                async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, Failure> {
                    KvView::open(self, identifier)
                }

                fn convert_error(&mut self, error: Failure) -> wasmtime::Result<store::Error> {
                    Ok(match error {
                        Failure::AccessDenied => store::Error::AccessDenied,
                        failure => store::Error::Other(failure.message()),
                    })
                }
            }

            impl batch::Host for KvView<'_> {
                async fn get_many(
                    &mut self,
                    bucket: Resource<Bucket>,
                    keys: Vec<String>,
                ) -> Result<Vec<Option<(String, Vec<u8>)>>, Failure> {
                    KvView::get_many(self, &bucket, keys).await
                }

                async fn set_many(
                    &mut self,
                    bucket: Resource<Bucket>,
                    entries: Vec<(String, Vec<u8>)>,
                ) -> Result<(), Failure> {
                    KvView::set_many(self, &bucket, entries).await
                }

                async fn delete_many(
                    &mut self,
                    bucket: Resource<Bucket>,
                    keys: Vec<String>,
                ) -> Result<(), Failure> {
                    KvView::delete_many(self, &bucket, keys).await
                }
            }

            impl store::HostBucket for KvView<'_> {
                async fn get(
                    &mut self,
                    bucket: Resource<Bucket>,
                    key: String,
                ) -> Result<Option<Vec<u8>>, Failure> {
                    KvView::get(self, &bucket, key).await
                }

                async fn set(
                    &mut self,
                    bucket: Resource<Bucket>,
                    key: String,
                    value: Vec<u8>,
                ) -> Result<(), Failure> {
                    KvView::set(self, &bucket, key, value).await
                }

                async fn delete(
                    &mut self,
                    bucket: Resource<Bucket>,
                    key: String,
                ) -> Result<(), Failure> {
                    KvView::delete(self, &bucket, key).await
                }

                async fn exists(
                    &mut self,
                    bucket: Resource<Bucket>,
                    key: String,
                ) -> Result<bool, Failure> {
                    KvView::exists(self, &bucket, key).await
                }

                async fn list_keys(
                    &mut self,
                    bucket: Resource<Bucket>,
                    cursor: Option<$cursor>,
                ) -> Result<store::KeyResponse, Failure> {
                    let (keys, cursor) = Cursor::list(self, &bucket, cursor).await?;
                    Ok(store::KeyResponse { keys, cursor })
                }

                async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
                    self.table.delete(bucket)?;
                    Ok(())
                }
            }
        };
    };
}

store_and_batch!(draft, u64);
store_and_batch!(draft2, String);

/// How each version's `list-keys` cursor pages.
trait Cursor: Sized {
    async fn list(
        view: &mut KvView<'_>,
        bucket: &Resource<Bucket>,
        cursor: Option<Self>,
    ) -> Result<(Vec<String>, Option<Self>), Failure>;
}

impl Cursor for u64 {
    async fn list(
        view: &mut KvView<'_>,
        bucket: &Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), Failure> {
        view.list_from(bucket, cursor.unwrap_or(0)).await
    }
}

impl Cursor for String {
    async fn list(
        view: &mut KvView<'_>,
        bucket: &Resource<Bucket>,
        cursor: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), Failure> {
        let page = view.list(bucket, cursor).await?;
        Ok((page.keys, page.next))
    }
}

impl draft::wasi::keyvalue::atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, Failure> {
        let sum = KvView::increment(self, &bucket, key, unsigned_delta(delta)?).await?;
        unsigned_sum(sum)
    }
}

mod atomics2 {
    use wasmtime::component::Resource;

    use super::draft2::wasi::keyvalue::atomics::{self, CasError};
    use super::draft2::wasi::keyvalue::store::Error as StoreError;
    use super::{Bucket, Cas, Failure, KvView};

    impl atomics::Host for KvView<'_> {
        async fn increment(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
            delta: i64,
        ) -> Result<i64, Failure> {
            KvView::increment(self, &bucket, key, delta).await
        }

        async fn swap(
            &mut self,
            cas: Resource<Cas>,
            value: Vec<u8>,
        ) -> wasmtime::Result<Result<(), CasError>> {
            Ok(match KvView::swap(self, cas, value).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(fresh)) => Err(CasError::CasFailed(fresh)),
                Err(Failure::AccessDenied) => Err(CasError::StoreError(StoreError::AccessDenied)),
                Err(failure) => Err(CasError::StoreError(StoreError::Other(failure.message()))),
            })
        }
    }

    impl atomics::HostCas for KvView<'_> {
        async fn new(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
        ) -> Result<Resource<Cas>, Failure> {
            KvView::new_cas(self, &bucket, key).await
        }

        async fn current(&mut self, cas: Resource<Cas>) -> Result<Option<Vec<u8>>, Failure> {
            Ok(self.table.get(&cas)?.current.clone())
        }

        async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
            self.table.delete(cas)?;
            Ok(())
        }
    }
}

//! `wasi:config/store` for guests, every version in use: `0.2.0-rc.1`
//! (wasmtime 40 and later, `wasmtime serve -S config`, wasmCloud 2.7),
//! `0.2.0-draft-2024-09-27` (Spin 4) and `0.2.0-draft` (wasmtime 39 and
//! earlier). The three differ only in their package version (the WIT,
//! vendored in `host/wit/`, is the same file), and a component links only
//! against the one it was built for, so all three are linked, each bound
//! by its own `bindgen!` over one [`ConfigView`].
//!
//! The values are the policy's `[config]` table, read when the guest asks,
//! so a reused instance sees its policy's values (a policy edit retires it).
//! A key the policy does not set is `none`; `get-all` lists every key the
//! policy sets.

use wasmtime::component::{HasData, Linker};

use crate::policy::{ConfigValue, Policy};
use crate::secrets::Secrets;

mod rc1 {
    wasmtime::component::bindgen!({
        path: "wit/config-0.2.0-rc.1",
        world: "wasi:config/imports",
        imports: { default: trappable },
    });
}

mod draft_2024_09_27 {
    wasmtime::component::bindgen!({
        path: "wit/config-0.2.0-draft-2024-09-27",
        world: "wasi:config/imports",
        imports: { default: trappable },
    });
}

mod draft {
    wasmtime::component::bindgen!({
        path: "wit/config-0.2.0-draft",
        world: "wasi:config/imports",
        imports: { default: trappable },
    });
}

/// What one invocation's guest may read: its policy's `[config]`, with
/// the secrets it names.
pub struct ConfigView<'a> {
    pub policy: &'a Policy,
    pub secrets: Option<&'a Secrets>,
}

impl ConfigView<'_> {
    /// The value of `key`, if the policy sets it; `Err` is the interface's
    /// `upstream` error.
    fn get(&self, key: &str) -> Result<Option<String>, String> {
        let value = self.policy.config.get(key);
        value.map(|value| self.resolve(value)).transpose()
    }

    fn get_all(&self) -> Result<Vec<(String, String)>, String> {
        self.policy
            .config
            .iter()
            .map(|(key, value)| Ok((key.clone(), self.resolve(value)?)))
            .collect()
    }

    /// A secret's value as it is now, so a changed secret reaches the next
    /// call. One that is not set (the API refuses to remove a secret a
    /// policy in force names, but a call can fall between a removal and the
    /// policy edit that made it possible, and a peer can remove one a
    /// policy here still names) is an error naming it, never a value.
    fn resolve(&self, value: &ConfigValue) -> Result<String, String> {
        match value {
            ConfigValue::Text(text) => Ok(text.clone()),
            ConfigValue::Secret { secret } => self
                .secrets
                .and_then(|secrets| secrets.get(&secret.0))
                .map(|value| value.to_string())
                .ok_or_else(|| format!("secret {:?} is not set on this host", secret.0)),
        }
    }
}

/// Binds one version's `store` interface to [`ConfigView`].
macro_rules! store_version {
    ($version:ident) => {
        impl $version::wasi::config::store::Host for ConfigView<'_> {
            fn get(
                &mut self,
                key: String,
            ) -> wasmtime::Result<Result<Option<String>, $version::wasi::config::store::Error>>
            {
                Ok(ConfigView::get(self, &key)
                    .map_err($version::wasi::config::store::Error::Upstream))
            }

            fn get_all(
                &mut self,
            ) -> wasmtime::Result<Result<Vec<(String, String)>, $version::wasi::config::store::Error>>
            {
                Ok(ConfigView::get_all(self).map_err($version::wasi::config::store::Error::Upstream))
            }
        }
    };
}

store_version!(rc1);
store_version!(draft_2024_09_27);
store_version!(draft);

struct HasConfig;

impl HasData for HasConfig {
    type Data<'a> = ConfigView<'a>;
}

/// Links every version's `wasi:config/store` to the view `view` gives.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ConfigView<'_>,
) -> wasmtime::Result<()> {
    rc1::wasi::config::store::add_to_linker::<T, HasConfig>(linker, view)?;
    draft_2024_09_27::wasi::config::store::add_to_linker::<T, HasConfig>(linker, view)?;
    draft::wasi::config::store::add_to_linker::<T, HasConfig>(linker, view)?;
    Ok(())
}

//! Process-wide registry of loaded PKCS#11 modules.
//!
//! `C_Initialize` / `C_Finalize` act on the whole process, so two wrappers
//! using the same module must share one initialised instance; finalising it
//! for one would close the sessions of the other. Each user holds a
//! [`ModuleLease`]; the module is finalised (if this crate initialised it)
//! when the last lease is dropped, under the registry lock so that a
//! concurrent open cannot see a half-finalised module.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};

use crate::error::HsmError;
use crate::raw::RawModule;

/// One loaded and initialised PKCS#11 module.
#[derive(Debug)]
pub(crate) struct Module {
    /// The path as configured (for messages).
    pub(crate) path: PathBuf,
    /// `cryptoki` context.
    pub(crate) ctx: Pkcs11,
    /// Direct function-list access (see [`crate::raw`]).
    pub(crate) raw: RawModule,
    /// Whether our `C_Initialize` succeeded (vs. someone else in the
    /// process had already initialised the module): only then do we finalise.
    owns_init: bool,
}

struct Entry {
    key: PathBuf,
    module: Arc<Module>,
    leases: usize,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn registry() -> MutexGuard<'static, Vec<Entry>> {
    // A panic while holding the lock leaves the list consistent (entries are
    // pushed/removed atomically), so poisoning is not a reason to give up.
    REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Shared use of a loaded module; see the module docs.
#[derive(Debug)]
pub(crate) struct ModuleLease {
    module: Arc<Module>,
    key: PathBuf,
}

impl std::ops::Deref for ModuleLease {
    type Target = Module;
    fn deref(&self) -> &Module {
        &self.module
    }
}

impl ModuleLease {
    /// Loads and initialises `path`, or shares the instance already loaded.
    pub(crate) fn acquire(path: &Path) -> Result<Self, HsmError> {
        let load_err = |detail: String| HsmError::ModuleLoad { module: path.to_path_buf(), detail };
        let key = std::fs::canonicalize(path).map_err(|e| load_err(e.to_string()))?;
        if !key.is_file() {
            return Err(load_err("not a regular file".into()));
        }
        let mut reg = registry();
        if let Some(entry) = reg.iter_mut().find(|e| e.key == key) {
            entry.leases += 1;
            return Ok(ModuleLease { module: entry.module.clone(), key });
        }
        let ctx = Pkcs11::new(&key).map_err(|e| load_err(describe_load_error(&e)))?;
        let owns_init = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => true,
            Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::info!(module = %path.display(), "PKCS#11 module was already initialised in this process; sharing it");
                false
            }
            Err(e) => {
                return Err(HsmError::ModuleInit { module: path.to_path_buf(), detail: e.to_string() });
            }
        };
        let raw = match RawModule::load(&key) {
            Ok(raw) => raw,
            Err(e) => {
                if owns_init {
                    finalize(&ctx, path);
                }
                return Err(load_err(describe_load_error(&e)));
            }
        };
        let module = Arc::new(Module { path: path.to_path_buf(), ctx, raw, owns_init });
        reg.push(Entry { key: key.clone(), module: module.clone(), leases: 1 });
        Ok(ModuleLease { module, key })
    }
}

impl Drop for ModuleLease {
    fn drop(&mut self) {
        let mut reg = registry();
        let Some(pos) = reg.iter().position(|e| e.key == self.key) else {
            return;
        };
        reg[pos].leases -= 1;
        if reg[pos].leases == 0 {
            let entry = reg.swap_remove(pos);
            if entry.module.owns_init {
                finalize(&entry.module.ctx, &entry.module.path);
            }
        }
    }
}

fn finalize(ctx: &Pkcs11, path: &Path) {
    if let Err(e) = ctx.clone().finalize() {
        tracing::warn!(module = %path.display(), error = %e, "C_Finalize failed");
    }
}

fn describe_load_error(e: &Error) -> String {
    match e {
        Error::LibraryLoading(inner) => inner.to_string(),
        Error::MissingSymbol(sym) => format!("the library does not export {sym}; is it a PKCS#11 module?"),
        other => other.to_string(),
    }
}

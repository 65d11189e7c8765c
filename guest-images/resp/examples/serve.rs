//! A host-side server around the engine, for trying it with real clients:
//!
//! ```text
//! cargo run -p kvstore-resp --example serve -- 127.0.0.1:6390 [limit-bytes]
//! redis-cli -p 6390 ping
//! redis-benchmark -p 6390 -t set,get,incr,mset,ping -q
//! ```
//!
//! One thread per connection and a mutex around the store: a convenience for the host, not
//! the guest's design (the guest polls all connections from one loop). It binds where it is
//! told; give it a loopback address.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvstore_resp::{Conn, ConnStatus, Store};

fn serve(mut stream: TcpStream, store: Arc<Mutex<Store>>, start: Instant) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let adjust = |delta: isize| {
        let mut s = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = s.connected_clients().saturating_add_signed(delta);
        s.set_connected_clients(n);
    };
    adjust(1);
    let result = serve_conn(&mut stream, &store, start);
    adjust(-1);
    result
}

fn serve_conn(stream: &mut TcpStream, store: &Mutex<Store>, start: Instant) -> std::io::Result<()> {
    let mut conn = Conn::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = if conn.has_pending_input() { 0 } else { stream.read(&mut buf)? };
        if n == 0 && !conn.has_pending_input() {
            return Ok(());
        }
        let now_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let status = {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            conn.feed(buf.get(..n).unwrap_or(&[]), &mut store, now_ns, &mut out)
        };
        stream.write_all(&out)?;
        out.clear();
        if status == ConnStatus::Close {
            return Ok(());
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:6390".to_string());
    let store = match args.next().and_then(|s| s.parse().ok()) {
        Some(limit) => Store::with_limit(limit),
        None => Store::new(),
    };
    let store = Arc::new(Mutex::new(store));
    let start = Instant::now();
    let listener = TcpListener::bind(&addr)?;
    eprintln!("kvstore-resp example listening on {addr}");
    for stream in listener.incoming() {
        let stream = stream?;
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, store, start) {
                eprintln!("connection ended: {e}");
            }
        });
    }
    Ok(())
}

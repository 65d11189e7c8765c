//! The control socket: a unix socket on which each connection sends one
//! request line and gets one JSON line back, and the clients that `ftvm
//! status` and `ftvm switchover` use.
//!
//! Requests: nothing (the client closes its sending side at once, or sends
//! an empty line): the status; `switchover`: a planned switchover, answered
//! once it is done (`{"ok": true, ...}`) or refused (`{"error": "..."}`). A
//! client that neither sends nor closes gets the status after
//! [`REQUEST_WAIT`].

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::status::Board;

/// Mode of the control socket: its owner only (status shows the pair's
/// addresses and state).
pub const SOCKET_MODE: u32 = 0o600;

/// How long a connection may take to send its request before it is taken
/// for a status query.
pub const REQUEST_WAIT: Duration = Duration::from_secs(1);

/// How long `ftvm switchover` waits for the answer.
pub const SWITCHOVER_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket's directory {}", path.display())]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("control socket {} is in use by another ftvm", path.display())]
    InUse { path: PathBuf },
    #[error("--control {} exists and is not a socket: refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot bind control socket {}", path.display())]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("no ftvm is listening on control socket {}", path.display())]
    NotListening { path: PathBuf, source: std::io::Error },
    #[error("permission denied on control socket {} (it is readable by its owner only: run as that user, e.g. root)", path.display())]
    Permission { path: PathBuf },
    #[error("reading control socket {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the control socket {} answered something else than JSON", path.display())]
    NotJson { path: PathBuf },
}

/// A served control socket; the socket file is removed on drop.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Serve `board` at `path`. A stale socket (nobody listening) is
    /// replaced; a live one, or anything that is not a socket, is refused.
    pub fn serve(path: &Path, board: Arc<Board>) -> Result<ControlSocket, ControlError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| ControlError::Directory { path: dir.to_path_buf(), source })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path: path.to_path_buf() });
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse { path: path.to_path_buf() });
                }
                let _ = std::fs::remove_file(path);
            }
            Err(_) => {}
        }
        let listener =
            UnixListener::bind(path).map_err(|source| ControlError::Bind { path: path.to_path_buf(), source })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(|source| ControlError::Bind { path: path.to_path_buf(), source })?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let board = board.clone();
                    // A switchover answers when it is done: status queries
                    // meanwhile are served on their own threads.
                    let spawned =
                        std::thread::Builder::new().name("control-conn".into()).spawn(move || answer(conn, &board));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot answer on the control socket");
                    }
                }
            })
            .map_err(|source| ControlError::Bind { path: path.to_path_buf(), source })?;
        Ok(ControlSocket { path: path.to_path_buf() })
    }
}

/// Read one request line (at most 256 bytes) and answer it.
fn answer(mut conn: UnixStream, board: &Board) {
    let _ = conn.set_read_timeout(Some(REQUEST_WAIT));
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while request.len() < 256 {
        match conn.read(&mut byte) {
            Ok(1) if byte[0] != b'\n' => request.push(byte[0]),
            _ => break,
        }
    }
    let line = match String::from_utf8_lossy(&request).trim() {
        "" | "status" => serde_json::to_string(&board.snapshot()).unwrap_or_else(|_| "{}".into()),
        "switchover" => match board.switchover() {
            Ok(mut report) => {
                if let Some(map) = report.as_object_mut() {
                    map.insert("ok".into(), serde_json::Value::Bool(true));
                }
                report.to_string()
            }
            Err(e) => serde_json::json!({ "ok": false, "error": e }).to_string(),
        },
        other => serde_json::json!({ "ok": false, "error": format!("unknown request {other:?}") }).to_string(),
    };
    let _ = writeln!(conn, "{line}");
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Read the status a control socket serves.
pub fn query(path: &Path) -> Result<serde_json::Value, ControlError> {
    request(path, "", Duration::from_secs(5))
}

/// Send one request line and read the JSON answer, waiting at most `wait`.
pub fn request(path: &Path, line: &str, wait: Duration) -> Result<serde_json::Value, ControlError> {
    let mut conn = UnixStream::connect(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::Permission { path: path.to_path_buf() }
        } else {
            ControlError::NotListening { path: path.to_path_buf(), source }
        }
    })?;
    let read = |source| ControlError::Read { path: path.to_path_buf(), source };
    if !line.is_empty() {
        writeln!(conn, "{line}").map_err(read)?;
    }
    // The request is complete: an empty one is a status query.
    conn.shutdown(std::net::Shutdown::Write).map_err(read)?;
    conn.set_read_timeout(Some(wait)).map_err(read)?;
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(read)?;
    serde_json::from_str(text.trim()).map_err(|_| ControlError::NotJson { path: path.to_path_buf() })
}

/// The status as aligned `key value` lines for people; nested objects
/// (heartbeats, last_failure) as `key.sub value`.
pub fn human(status: &serde_json::Value) -> String {
    fn walk(out: &mut String, prefix: &str, v: &serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, val) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(out, &key, val);
                }
            }
            serde_json::Value::String(s) => out.push_str(&format!("{prefix:<28} {s}\n")),
            serde_json::Value::Null => out.push_str(&format!("{prefix:<28} -\n")),
            other => out.push_str(&format!("{prefix:<28} {other}\n")),
        }
    }
    let mut out = String::new();
    walk(&mut out, "", status);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Role;

    #[test]
    fn serves_status_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kv.sock");
        let board = Arc::new(Board::new("kv", Role::Primary));
        let sock = ControlSocket::serve(&path, board.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        let v = query(&path).unwrap();
        assert_eq!(v["role"], "primary");
        assert!(matches!(ControlSocket::serve(&path, board), Err(ControlError::InUse { .. })));
        drop(sock);
        assert!(!path.exists(), "the socket file is removed on drop");
    }

    #[test]
    fn answers_switchover_requests_with_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.sock");
        let board = Arc::new(Board::new("kv", Role::Secondary));
        let _sock = ControlSocket::serve(&path, board.clone()).unwrap();
        let wait = Duration::from_secs(5);
        let v = request(&path, "switchover", wait).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().contains("this copy is the secondary"), "{v}");
        board.set_role(Role::Primary);
        board.set_switch_handler(Some(Arc::new(|| Ok(serde_json::json!({ "exit": 1000 })))));
        let v = request(&path, "switchover", wait).unwrap();
        assert_eq!((v["ok"].as_bool(), v["exit"].as_u64()), (Some(true), Some(1000)), "{v}");
        let v = request(&path, "reboot", wait).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        // An empty request is a status query.
        assert_eq!(query(&path).unwrap()["role"], "primary");
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, b"data").unwrap();
        let board = Arc::new(Board::new("kv", Role::Primary));
        let err = ControlSocket::serve(&path, board).err().unwrap();
        assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap());
        let board = Arc::new(Board::new("kv", Role::Secondary));
        let _sock = ControlSocket::serve(&path, board).unwrap();
        assert_eq!(query(&path).unwrap()["role"], "secondary");
    }

    #[test]
    fn human_format_flattens_objects_and_nulls() {
        let v = serde_json::json!({"role": "primary", "heartbeats": {"sent": 3}, "last_failure": null});
        let text = human(&v);
        assert!(text.contains("heartbeats.sent"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("last_failure") && l.ends_with(" -")), "{text}");
        assert!(!text.contains('{'), "{text}");
    }
}

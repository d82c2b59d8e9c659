//! CRI streaming sessions: `kubectl exec -i`/`-t` and `kubectl attach` of CRI containers.
//!
//! CRI's `Exec` and `Attach` answer with the URL of the runtime's streaming server
//! (containerd's, on loopback), which serves Kubernetes' remote-command protocol over an
//! HTTP `Upgrade: SPDY/3.1`, as kubelet's own streaming server does. edgecore is its client
//! here, as kubelet is when it proxies a session (client-go's `remotecommand`, protocol
//! `v4.channel.k8s.io`): it opens the `error`, `stdin`, `stdout`, `stderr` and `resize` streams
//! the session needs, and relays them to and from the session's ends
//! ([`crate::exec::Session`]: the link to the cloud, or MetaServer's WebSocket). Stdin's end is
//! the stdin stream's FIN, so `kubectl exec -i … < file` sees end of file; the final `Status`
//! (exit code included) comes on the error stream and ends the session. The framing is
//! [`transport::spdy`]'s.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transport::spdy::{self, Decoder, Encoder, Frame};
use transport::stream::StreamMessage;

use crate::exec::{exit_status, Session};

/// Which of a session's streams are wanted (Kubernetes' `stdin`, `stdout`, `stderr`, `tty`;
/// with a terminal, stderr is merged into stdout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// The remote-command protocol spoken with the runtime.
const PROTOCOL: &str = "v4.channel.k8s.io";
/// Connecting and upgrading may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the final status, output still on its way is awaited this long.
const DRAIN: Duration = Duration::from_secs(1);
/// Stdin goes in data frames of at most this many bytes.
const MAX_DATA: usize = 32 * 1024;

/// The stream ids this client opens (odd, in this order: as client-go opens them).
struct Ids {
    error: u32,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

/// Runs a session against the runtime's streaming server at `url` until the command (or the
/// attached container) ends, the client leaves, or the runtime's connection fails. The session
/// always ends with an `Exit` unless the client left.
pub async fn relay(url: &str, streams: Streams, command: &[String], mut session: Session) {
    let ended = match connect(url).await {
        Ok((socket, leftover)) => run(socket, leftover, streams, &mut session).await,
        Err(e) => Err(format!("cannot reach the runtime's streaming server: {e}")),
    };
    match ended {
        Ok(Some(status)) => {
            let _ = session
                .output
                .send(StreamMessage::Exit(status.into()))
                .await;
        }
        Ok(None) => {} // the client left
        Err(message) => {
            let _ = session
                .output
                .send(StreamMessage::Stderr(format!("{message}\n").into_bytes()))
                .await;
            let _ = session
                .output
                .send(StreamMessage::exit(&exit_status(command, 126)))
                .await;
        }
    }
}

/// Connects to `http://HOST:PORT/PATH` and upgrades to SPDY/3.1 with the remote-command
/// protocol; returns the socket and any bytes read past the response's head.
async fn connect(url: &str) -> Result<(TcpStream, Vec<u8>), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only plain http:// streaming servers are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let mut socket = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| format!("{authority}: no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("{authority}: {e}"))?;
    socket.set_nodelay(true).ok();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
         Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {PROTOCOL}\r\nContent-Length: 0\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(1024);
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(CONNECT_TIMEOUT, socket.read(&mut chunk))
            .await
            .map_err(|_| "no answer to the upgrade".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the streaming server closed the connection".into());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > 16 * 1024 {
            return Err("an answer head over 16 KiB".into());
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let status_line = text.lines().next().unwrap_or_default();
    if !status_line.contains(" 101") {
        let body = String::from_utf8_lossy(&head[end..]).trim().to_owned();
        return Err(format!(
            "the streaming server answered {status_line:?} {body}"
        ));
    }
    Ok((socket, head[end..].to_vec()))
}

/// The session proper; `Ok(Some(status))` when the command ended, `Ok(None)` when the client
/// left.
async fn run(
    mut socket: TcpStream,
    leftover: Vec<u8>,
    streams: Streams,
    session: &mut Session,
) -> Result<Option<Vec<u8>>, String> {
    let mut encoder = Encoder::new();
    let mut decoder = Decoder::new();
    decoder.push(&leftover);
    let mut next_id = 1u32;
    let mut open = |wanted: bool| {
        wanted.then(|| {
            let id = next_id;
            next_id += 2;
            id
        })
    };
    let ids = Ids {
        error: open(true).unwrap_or(1),
        stdin: open(streams.stdin),
        stdout: open(streams.stdout),
        stderr: open(streams.stderr && !streams.tty),
        resize: open(streams.tty),
    };
    let mut out = Vec::new();
    for (id, kind, reads_only) in [
        (Some(ids.error), "error", true),
        (ids.stdin, "stdin", false),
        (ids.stdout, "stdout", true),
        (ids.stderr, "stderr", true),
        (ids.resize, "resize", false),
    ] {
        if let Some(id) = id {
            out.extend(encoder.syn_stream(id, reads_only, &[("streamtype", kind)]));
        }
    }
    socket.write_all(&out).await.map_err(|e| e.to_string())?;

    let mut error = Vec::new();
    let mut error_done = false;
    let mut outputs_open = usize::from(ids.stdout.is_some()) + usize::from(ids.stderr.is_some());
    let mut input_open = true;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
            match frame {
                Frame::Data {
                    stream_id,
                    fin,
                    data,
                } => {
                    if stream_id == ids.error {
                        error.extend_from_slice(&data);
                        error_done |= fin;
                    } else if Some(stream_id) == ids.stdout || Some(stream_id) == ids.stderr {
                        if !data.is_empty() {
                            let message = if Some(stream_id) == ids.stdout {
                                StreamMessage::Stdout(data.to_vec())
                            } else {
                                StreamMessage::Stderr(data.to_vec())
                            };
                            if session.output.send(message).await.is_err() {
                                return Ok(None);
                            }
                        }
                        if fin {
                            outputs_open = outputs_open.saturating_sub(1);
                        }
                    }
                }
                Frame::RstStream { stream_id, .. } if stream_id == ids.error => error_done = true,
                Frame::Ping(id) => socket
                    .write_all(&spdy::ping(id))
                    .await
                    .map_err(|e| e.to_string())?,
                Frame::GoAway { .. } => error_done = true,
                _ => {}
            }
        }
        if error_done {
            if outputs_open == 0 {
                return Ok(Some(final_status(&error)));
            }
            drain_until.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN);
        }
        tokio::select! {
            read = socket.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    // The runtime closed the session: what it said is the end.
                    return Ok(Some(final_status(&error)));
                }
                Ok(n) => decoder.push(&buf[..n]),
            },
            message = session.input.recv(), if input_open => {
                let frames = match message {
                    Some(StreamMessage::Stdin(bytes)) => match ids.stdin {
                        Some(id) => bytes.chunks(MAX_DATA).map(|c| spdy::data(id, false, c)).collect(),
                        None => Vec::new(),
                    },
                    Some(StreamMessage::StdinClose) | None => {
                        input_open = false;
                        ids.stdin.map(|id| spdy::data(id, true, &[])).into_iter().collect()
                    }
                    Some(StreamMessage::Resize { width, height }) => ids
                        .resize
                        .map(|id| {
                            let size = format!("{{\"Width\":{width},\"Height\":{height}}}");
                            spdy::data(id, false, size.as_bytes())
                        })
                        .into_iter()
                        .collect(),
                    Some(_) => Vec::new(),
                };
                for frame in frames {
                    socket.write_all(&frame).await.map_err(|e| e.to_string())?;
                }
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                return Ok(Some(final_status(&error)));
            }
            _ = session.cancelled.cancelled() => return Ok(None),
        }
    }
}

/// The session's final `Status`: what the runtime sent on the error stream (v4: a
/// Kubernetes `Status`, with the exit code of a failed command), or `Success` for nothing.
fn final_status(error: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(error);
    let text = text.trim();
    if text.is_empty() {
        return serde_json::json!({"metadata": {}, "status": "Success"})
            .to_string()
            .into_bytes();
    }
    if serde_json::from_str::<serde_json::Value>(text).is_ok() {
        return text.as_bytes().to_vec();
    }
    // An older protocol's plain error text.
    serde_json::json!({"metadata": {}, "status": "Failure", "message": text})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_status_is_the_runtimes_or_success() {
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&final_status(b"")).unwrap()["status"],
            "Success"
        );
        let failure = br#"{"metadata":{},"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(final_status(failure), failure.to_vec());
        let plain: serde_json::Value = serde_json::from_slice(&final_status(b"boom")).unwrap();
        assert_eq!(plain["message"], "boom");
    }
}

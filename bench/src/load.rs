//! Load generation: `wrk` for closed-loop throughput (the same tool for every
//! server), and an open-loop generator of our own for latency at a fixed
//! rate, corrected for coordinated omission: each request's latency counts
//! from when it was scheduled to go out, not from when a busy connection got
//! round to sending it (what wrk2 does).

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx/3xx answers plus socket errors: should be 0.
    pub errors: u64,
}

/// `wrk -t1 -c<connections> -d<seconds>s --latency <url>`.
pub fn wrk(url: &str, connections: u32, seconds: u32) -> Result<WrkResult> {
    wrk_script(url, connections, seconds, None)
}

/// [`wrk`] with a Lua script (`-s`) that shapes the requests.
pub fn wrk_script(
    url: &str,
    connections: u32,
    seconds: u32,
    script: Option<&std::path::Path>,
) -> Result<WrkResult> {
    let mut command = Command::new("wrk");
    command.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Result<WrkResult> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_sec: f64 = field("Requests/sec:")
        .context("no Requests/sec in wrk output")?
        .parse()?;
    let p50_ms = parse_duration_ms(field("50%").context("no p50 in wrk output")?)?;
    let p99_ms = parse_duration_ms(field("99%").context("no p99 in wrk output")?)?;
    let mut errors = 0;
    if let Some(non2xx) = field("Non-2xx or 3xx responses:") {
        errors += non2xx.parse::<u64>().unwrap_or(0);
    }
    if let Some(socket) = field("Socket errors:") {
        // "connect 0, read 0, write 0, timeout 0"
        errors += socket
            .split(',')
            .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(WrkResult {
        requests_per_sec,
        p50_ms,
        p99_ms,
        errors,
    })
}

fn parse_duration_ms(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .context("no unit")?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        other => bail!("unknown wrk unit {other}"),
    })
}

/// What one open-loop run measured.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoopResult {
    pub sent: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Sends `rate` requests per second for `seconds` over `connections`
/// keep-alive connections; latency counts from each request's scheduled time.
pub async fn open_loop(
    url: &str,
    rate: f64,
    seconds: f64,
    connections: usize,
) -> Result<OpenLoopResult> {
    let uri: hyper::Uri = url.parse()?;
    let authority = uri.authority().context("no authority")?.to_string();
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let uri = Arc::new(uri);
    let mut tasks = Vec::new();
    for conn in 0..connections {
        let authority = authority.clone();
        let uri = Arc::clone(&uri);
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&authority).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            let mut failed = 0usize;
            let mut i = conn;
            while i < total {
                let scheduled = start + interval * i as u32;
                tokio::time::sleep_until(scheduled).await;
                let request = hyper::Request::get(uri.as_ref())
                    .header("host", &authority)
                    .body(Empty::<Bytes>::new())?;
                match sender.send_request(request).await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let _ = response.into_body().collect().await;
                        if !ok {
                            failed += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
                latencies.push(scheduled.elapsed());
                i += connections;
            }
            anyhow::Ok((latencies, failed))
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failed = 0;
    for task in tasks {
        let (l, f) = task.await??;
        latencies.extend(l);
        failed += f;
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(OpenLoopResult {
        sent: latencies.len(),
        failed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// A one-off HTTP/1.1 request from the orchestrator (deploys, readiness).
/// Returns the status code.
pub fn blocking_request(method: &str, url: &str, token: Option<&str>, body: &[u8]) -> Result<u16> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = std::net::TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {authority}\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    Ok(status)
}

/// Polls `url` with a POST of `body` until it answers 200 (at most a
/// minute).
pub fn wait_for_200_post(url: &str, body: &[u8]) -> Result<()> {
    let since = Instant::now();
    while blocking_request("POST", url, None, body)? != 200 {
        if since.elapsed() > Duration::from_secs(60) {
            bail!("{url} did not answer 200 within a minute");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Polls `url` until it answers 200; returns how long that took.
pub fn wait_for_200(url: &str, since: Instant, limit: Duration) -> Result<Duration> {
    loop {
        if let Ok(200) = blocking_request("GET", url, None, b"") {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            bail!("{url} did not answer 200 within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// TCP sockets in TIME_WAIT on this machine (IPv4 and IPv6), from
/// `/proc/net/tcp*` (state `06`).
pub fn time_wait_sockets() -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| line.split_whitespace().nth(3) == Some("06"))
                .count()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 10s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n  Latency Distribution\n     50%  612.00us\n     75%    1.10ms\n     90%    2.00ms\n     99%    5.23ms\n  80000 requests in 10.00s, 9.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:   8000.12\nTransfer/sec:      0.90MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests_per_sec, 8000.12);
        assert_eq!(r.p50_ms, 0.612);
        assert_eq!(r.p99_ms, 5.23);
        assert_eq!(r.errors, 7);
    }
}

//! Talks to Redis over outbound TCP (`wasi:sockets`), speaking RESP by hand:
//! `GET /?key=K` answers `{"key": K, "value": V}` (`null` when unset), `PUT
//! /?key=K` with the value as the body stores it. Where Redis is comes from
//! the policy's `[config] redis` (`HOST:PORT`), and the policy must grant
//! that destination in `[outbound] tcp` (see `policies/redis.toml`). A
//! refused or failed connection is `502` with the socket's error code
//! (`access-denied` when the policy does not grant it).
use lichen_sdk::{Error, Request, Response, Result, config};
use wasi::io::streams::{InputStream, OutputStream, StreamError};
use wasi::sockets::instance_network::instance_network;
use wasi::sockets::ip_name_lookup::resolve_addresses;
use wasi::sockets::network::{
    ErrorCode, IpAddress, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress, Ipv6SocketAddress,
    Network,
};
use wasi::sockets::tcp::TcpSocket;
use wasi::sockets::tcp_create_socket::create_tcp_socket;

/// Largest reply read.
const MAX_REPLY: usize = 1 << 20;

fn handle(req: Request) -> Result<Response> {
    let key = req
        .query_param("key")
        .ok_or_else(|| Error::new(400, "give the key as ?key=K"))?;
    let target = config::get("redis")?.unwrap_or_else(|| "127.0.0.1:6379".to_string());
    let mut redis = Connection::open(&target)?;
    match req.method() {
        "GET" => {
            let value = redis.command(&[b"GET", key.as_bytes()])?;
            let value = match value {
                Reply::Bulk(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
                Reply::Null => None,
                other => return Err(unexpected(other)),
            };
            Response::json(&serde_json::json!({ "key": key, "value": value }))
        }
        "PUT" => match redis.command(&[b"SET", key.as_bytes(), req.body()])? {
            Reply::Status(status) if status == "OK" => {
                Response::json(&serde_json::json!({ "key": key, "stored": true }))
            }
            other => Err(unexpected(other)),
        },
        _ => Err(Error::new(405, "GET or PUT")),
    }
}

fn unexpected(reply: Reply) -> Error {
    match reply {
        Reply::Error(message) => Error::new(502, format!("redis: {message}")),
        other => Error::new(502, format!("redis answered {other:?}")),
    }
}

/// A Redis reply, as far as this function reads them.
#[derive(Debug)]
enum Reply {
    Status(String),
    Error(String),
    Bulk(Vec<u8>),
    Null,
}

/// One TCP connection. Fields drop in order: the streams before their
/// socket.
struct Connection {
    input: InputStream,
    output: OutputStream,
    _socket: TcpSocket,
    buffer: Vec<u8>,
}

impl Connection {
    /// Connects to `HOST:PORT`, trying each address the name has.
    fn open(target: &str) -> Result<Connection> {
        let failed = |code: ErrorCode| {
            Error::new(
                502,
                format!("connecting to {target}: {} ({})", code.name(), code.message()),
            )
        };
        let (host, port) = target
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .ok_or_else(|| Error::new(500, format!("config redis = {target:?} is not HOST:PORT")))?;
        let network = instance_network();
        let mut last = ErrorCode::NameUnresolvable;
        for address in lookup(&network, host).map_err(failed)? {
            match connect(&network, address, port) {
                Ok((socket, input, output)) => {
                    return Ok(Connection {
                        input,
                        output,
                        _socket: socket,
                        buffer: Vec::new(),
                    });
                }
                Err(code) => last = code,
            }
        }
        Err(failed(last))
    }

    /// Sends one command and reads its reply.
    fn command(&mut self, args: &[&[u8]]) -> Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        for chunk in request.chunks(4096) {
            self.output
                .blocking_write_and_flush(chunk)
                .map_err(|e| stream_error("sending to redis", e))?;
        }
        self.reply()
    }

    fn reply(&mut self) -> Result<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        Ok(match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            "$" if rest == "-1" => Reply::Null,
            "$" => {
                let len: usize = rest.parse().map_err(|_| bad_reply(&line))?;
                if len > MAX_REPLY {
                    return Err(Error::new(502, "redis: a reply larger than 1 MiB"));
                }
                self.fill(len + 2)?;
                let mut bytes: Vec<u8> = self.buffer.drain(..len + 2).collect();
                bytes.truncate(len);
                Reply::Bulk(bytes)
            }
            _ => return Err(bad_reply(&line)),
        })
    }

    /// The next line, without its CRLF.
    fn line(&mut self) -> Result<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).take(end).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buffer.len() > MAX_REPLY {
                return Err(Error::new(502, "redis: a reply line longer than 1 MiB"));
            }
            self.read_more()?;
        }
    }

    fn fill(&mut self, len: usize) -> Result<()> {
        while self.buffer.len() < len {
            self.read_more()?;
        }
        Ok(())
    }

    fn read_more(&mut self) -> Result<()> {
        let bytes = self
            .input
            .blocking_read(64 << 10)
            .map_err(|e| stream_error("reading from redis", e))?;
        self.buffer.extend_from_slice(&bytes);
        Ok(())
    }
}

fn bad_reply(line: &str) -> Error {
    Error::new(502, format!("redis: a reply this function does not read: {line:?}"))
}

fn stream_error(doing: &str, error: StreamError) -> Error {
    match error {
        StreamError::Closed => Error::new(502, format!("{doing}: the connection closed")),
        StreamError::LastOperationFailed(e) => {
            Error::new(502, format!("{doing}: {}", e.to_debug_string()))
        }
    }
}

/// The addresses `host` has (an address is its own).
fn lookup(network: &Network, host: &str) -> std::result::Result<Vec<IpAddress>, ErrorCode> {
    let stream = resolve_addresses(network, host)?;
    let pollable = stream.subscribe();
    let mut addresses = Vec::new();
    loop {
        match stream.resolve_next_address() {
            Ok(Some(address)) => addresses.push(address),
            Ok(None) => return Ok(addresses),
            Err(ErrorCode::WouldBlock) => pollable.block(),
            Err(code) => return Err(code),
        }
    }
}

fn connect(
    network: &Network,
    address: IpAddress,
    port: u16,
) -> std::result::Result<(TcpSocket, InputStream, OutputStream), ErrorCode> {
    let (family, remote) = match address {
        IpAddress::Ipv4(address) => (
            IpAddressFamily::Ipv4,
            IpSocketAddress::Ipv4(Ipv4SocketAddress { port, address }),
        ),
        IpAddress::Ipv6(address) => (
            IpAddressFamily::Ipv6,
            IpSocketAddress::Ipv6(Ipv6SocketAddress {
                port,
                address,
                flow_info: 0,
                scope_id: 0,
            }),
        ),
    };
    let socket = create_tcp_socket(family)?;
    socket.start_connect(network, remote)?;
    let pollable = socket.subscribe();
    let streams = loop {
        match socket.finish_connect() {
            Ok(streams) => break streams,
            Err(ErrorCode::WouldBlock) => pollable.block(),
            Err(code) => return Err(code),
        }
    };
    drop(pollable);
    Ok((socket, streams.0, streams.1))
}

lichen_sdk::export!(handle);

//! Where a runner listens, and how to connect to it there.
//!
//! A sandboxed runner has a network namespace of its own: its loopback is its own, and
//! no other runner (nor anything else on the machine) can reach the port it listens on.
//! The server reaches it by making each socket inside that namespace: the thread that
//! opens the connection enters the namespace (`setns`), creates the socket and returns
//! to its own at once. A socket stays in the namespace it was made in, so the
//! connection then works from any thread, at the speed of any loopback connection.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use nix::sched::CloneFlags;
use tokio::net::{TcpSocket, TcpStream};

/// A runner's address, in the namespace it listens in. Cheap to clone; two endpoints
/// are equal when they are the same runner's.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `None`: the server's own namespace. Otherwise the runner's, once it is known.
    namespace: Option<Arc<OnceLock<OwnedFd>>>,
}

impl Endpoint {
    /// An address in the server's own network namespace.
    pub fn host(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, namespace: None }
    }

    /// An address in a namespace made for the runner, which [`Endpoint::enter`] names
    /// once the runner's first process exists. Until then, connecting fails.
    pub fn isolated(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, namespace: Some(Arc::default()) }
    }

    /// Sets the namespace to that of process `pid`. Returns false when it could not be
    /// opened (the process has gone).
    pub fn enter(&self, pid: u32) -> bool {
        let Some(slot) = &self.namespace else { return true };
        match std::fs::File::open(format!("/proc/{pid}/ns/net")) {
            Ok(file) => {
                let _ = slot.set(OwnedFd::from(file));
                true
            }
            Err(_) => false,
        }
    }

    /// Opens a TCP connection to the endpoint.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let socket = match &self.namespace {
            None => new_socket(self.addr)?,
            Some(slot) => {
                let Some(namespace) = slot.get() else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "the runner's network is not set up yet",
                    ));
                };
                socket_in(namespace, self.addr)?
            }
        };
        socket.connect(self.addr).await
    }
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Endpoint) -> bool {
        self.addr == other.addr
            && match (&self.namespace, &other.namespace) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Endpoint {}

impl Hash for Endpoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
        self.namespace.as_ref().map(|n| Arc::as_ptr(n) as usize).hash(state);
    }
}

fn new_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
}

/// The server's own network namespace, opened once.
fn home() -> std::io::Result<&'static OwnedFd> {
    static HOME: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HOME.get() {
        return Ok(fd);
    }
    let file = std::fs::File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| OwnedFd::from(file)))
}

/// A socket made inside `namespace`, by this thread stepping in and straight back out.
fn socket_in(namespace: &OwnedFd, addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let home = home()?;
    nix::sched::setns(namespace.as_fd(), CloneFlags::CLONE_NEWNET)?;
    let socket = new_socket(addr);
    // Leaving must not fail: this thread would make every later socket in the runner's
    // namespace. It can only fail if the server lost its own rights, and then nothing
    // it does afterwards could be trusted.
    if let Err(e) = nix::sched::setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
        panic!("cannot return to the server's network namespace: {e}");
    }
    socket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_isolated_endpoint_refuses_until_its_namespace_is_known_and_host_ones_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(Endpoint::host(addr).connect().await.is_ok());

        let isolated = Endpoint::isolated(addr);
        let e = isolated.connect().await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        // Our own process's namespace is the host's: the endpoint then connects.
        assert!(isolated.enter(std::process::id()));
        assert!(isolated.connect().await.is_ok());
        assert!(!Endpoint::isolated(addr).enter(u32::MAX));
    }

    #[test]
    fn endpoints_are_equal_only_for_the_same_runner() {
        let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let a = Endpoint::isolated(addr);
        assert_eq!(a, a.clone());
        assert_ne!(a, Endpoint::isolated(addr));
        assert_ne!(a, Endpoint::host(addr));
        assert_eq!(Endpoint::host(addr), Endpoint::host(addr));
    }
}

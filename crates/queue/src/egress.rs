//! Where the queue may send webhooks. A webhook URL comes from whoever may call an app
//! (anyone, for a public one), so by default it may not point into the machine or its
//! networks: loopback, link-local (cloud metadata services live there), private and
//! shared address space, and the server's own addresses are refused. The URL is checked
//! when the request is submitted (400 naming the rule) and again when the webhook is
//! sent: every address a name resolves to at that moment must pass ([`GuardedResolver`]),
//! so a name that resolved elsewhere at submit cannot be turned around afterwards.
//! Redirects are not followed. `--webhook-allow-private` lifts the address rules.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Which webhook addresses are refused.
#[derive(Debug, Clone, Default)]
pub struct WebhookPolicy {
    /// Private, loopback and link-local addresses are allowed too.
    pub allow_private: bool,
    /// The server's own addresses (refused unless `allow_private`).
    pub own: Vec<IpAddr>,
}

impl WebhookPolicy {
    /// Why a webhook may not go to `ip`, if it may not.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow_private {
            return None;
        }
        let ip = ip.to_canonical();
        let own = || self.own.iter().any(|own| own.to_canonical() == ip).then_some("it is an address of this server");
        let rule = match ip {
            IpAddr::V4(v4) => {
                let [a, b, ..] = v4.octets();
                if v4.is_loopback() {
                    Some("it is a loopback address")
                } else if v4.is_link_local() {
                    Some("it is a link-local address")
                } else if v4.is_private() || (a == 100 && (64..128).contains(&b)) {
                    Some("it is a private address")
                } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || a == 0 {
                    Some("it is not a unicast address")
                } else {
                    None
                }
            }
            IpAddr::V6(v6) => {
                let first = v6.segments()[0];
                if v6.is_loopback() {
                    Some("it is a loopback address")
                } else if first & 0xffc0 == 0xfe80 {
                    Some("it is a link-local address")
                } else if first & 0xfe00 == 0xfc00 {
                    Some("it is a private address")
                } else if v6.is_unspecified() || v6.is_multicast() {
                    Some("it is not a unicast address")
                } else {
                    None
                }
            }
        };
        rule.or_else(own)
    }

    /// Checks a webhook URL at submit: its host, or every address its name resolves to.
    pub async fn check(&self, url: &reqwest::Url) -> Result<(), String> {
        let port = url.port_or_known_default().unwrap_or(80);
        let Some(host) = url.host_str() else { return Err("it has no host".to_owned()) };
        // An IPv6 literal is written in brackets.
        let addrs: Vec<IpAddr> = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("its host {host:?} does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect(),
        };
        for ip in addrs {
            if let Some(rule) = self.refuses(ip) {
                return Err(format!(
                    "it goes to {ip}, and {rule}; webhooks may not reach into this machine or its networks \
                     (a server started with --webhook-allow-private allows it)"
                ));
            }
        }
        Ok(())
    }

    /// The client webhooks are sent with: names resolve only to allowed addresses, and
    /// redirects are not followed.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver(self.clone())))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    }
}

/// Resolves names as the system does, keeping only the addresses the policy allows.
#[derive(Debug)]
struct GuardedResolver(WebhookPolicy);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let allowed: Vec<SocketAddr> = found.filter(|a| policy.refuses(a.ip()).is_none()).collect();
            if allowed.is_empty() {
                return Err(format!("{} resolves to no address a webhook may go to", name.as_str()).into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_addresses_inside_the_machine_or_its_networks_are_refused() {
        let policy = WebhookPolicy { allow_private: false, own: vec!["198.51.100.7".parse().unwrap()] };
        let cases = [
            ("127.0.0.1", Some("loopback")),
            ("127.8.9.10", Some("loopback")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("fe80::1", Some("link-local")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("192.168.1.1", Some("private")),
            ("100.64.0.1", Some("private")),
            ("fd00::1", Some("private")),
            ("0.0.0.0", Some("not a unicast")),
            ("::", Some("not a unicast")),
            ("224.0.0.1", Some("not a unicast")),
            ("198.51.100.7", Some("this server")),
            ("93.184.216.34", None),
            ("172.32.0.1", None),
            ("2606:4700::1", None),
        ];
        for (ip, want) in cases {
            let got = policy.refuses(ip.parse().unwrap());
            match want {
                Some(rule) => assert!(got.is_some_and(|g| g.contains(rule)), "{ip}: {got:?}"),
                None => assert_eq!(got, None, "{ip}"),
            }
        }
        let open = WebhookPolicy { allow_private: true, own: vec![] };
        assert_eq!(open.refuses("127.0.0.1".parse().unwrap()), None);
    }
}

//! The SSRF guard: deliveries never reach loopback, private, link-local or cloud-metadata
//! addresses (checked after DNS resolution, at connect time) unless a tenant policy names that
//! host explicitly (or it is the configured egress proxy).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use crate::policy::PolicyHandle;

/// Whether an address is one a webhook may reach without the tenant naming its host explicitly.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local() // 169.254/16, cloud metadata included
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, AWS fd00:ec2::254 included
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 may reach private IPv4
                || (s[0] == 0x2001 && s[1] == 0xdb8))
        }
    }
}

/// Whether some tenant names `host` explicitly (not through a `*.` pattern) in its webhook hosts.
pub(super) fn named_explicitly(policies: &PolicyHandle, host: &str) -> bool {
    policies.current().tenants.values().any(|t| {
        t.webhooks
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    })
}

/// A resolver that drops non-public addresses unless the host is named explicitly by a policy
/// (or is the configured egress proxy, which deliveries must reach).
#[derive(Clone)]
pub struct GuardedResolver {
    pub(super) policies: PolicyHandle,
    pub(super) proxy_hosts: Arc<Vec<String>>,
}

/// Resolve `host`, keeping only public addresses unless `explicit`; refuse if none is left.
pub(super) async fn check_resolved(
    host: &str,
    explicit: bool,
) -> Result<Vec<SocketAddr>, std::io::Error> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| explicit || is_public(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves only to non-public addresses"),
        ));
    }
    Ok(allowed)
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_string();
        let explicit = named_explicitly(&self.policies, &host)
            || self
                .proxy_hosts
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&host));
        Box::pin(async move { Ok(check_resolved(&host, explicit).await?.into_iter()) })
    }
}

//! Stage 3: authenticate the tenant by its bearer key.
//!
//! The key is hashed (SHA-256) and looked up among the tenants' key hashes; the final comparison is
//! in constant time. The key itself goes no further: the forward stage sends the account's key.

use std::sync::Arc;

use http::{HeaderMap, header};

use super::{CallRequest, Stage};
use crate::error::GatewayError;
use crate::policy::{Policies, Tenant};

/// The tenant owning the request's `Authorization: Bearer <key>`.
pub fn authenticate(headers: &HeaderMap, policies: &Policies) -> Result<Arc<Tenant>, GatewayError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(GatewayError::Unauthorized(
            "missing Authorization: Bearer <key>",
        ))?;
    let value = value
        .to_str()
        .map_err(|_| GatewayError::Unauthorized("malformed Authorization header"))?;
    let (scheme, key) = value.split_once(' ').ok_or(GatewayError::Unauthorized(
        "Authorization must be 'Bearer <key>'",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(GatewayError::Unauthorized(
            "Authorization must be 'Bearer <key>'",
        ));
    }
    policies
        .tenant_for_key(key.trim())
        .ok_or(GatewayError::Unauthorized("invalid API key"))
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Authenticate;

impl Stage for Authenticate {
    const NAME: &'static str = "authenticate";

    fn apply(&self, req: &mut CallRequest) -> Result<(), GatewayError> {
        let tenant = authenticate(&req.headers, &req.policies)?;
        req.facts.tenant(&req.span, &tenant.id);
        req.tenant = Some(tenant);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::fixture_policies;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn known_keys_map_to_their_tenant() {
        let p = fixture_policies();
        assert_eq!(
            authenticate(&headers("Bearer demo-acme-key"), &p)
                .unwrap()
                .id,
            "acme"
        );
        assert_eq!(
            authenticate(&headers("bearer demo-globex-key"), &p)
                .unwrap()
                .id,
            "globex"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_refused() {
        let p = fixture_policies();
        for bad in [
            "Bearer nope",
            "Basic ZGVtbw==",
            "Bearer",
            "Bearer  ",
            "demo-acme-key",
        ] {
            let err = authenticate(&headers(bad), &p).unwrap_err();
            assert_eq!(err.code(), "unauthorized", "{bad}");
        }
        assert!(authenticate(&HeaderMap::new(), &p).is_err());
    }
}

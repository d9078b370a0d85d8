//! Stage 7: metadata redaction. Before anything leaves the gateway, personal data in `metadata`
//! is dropped, masked or replaced by a keyed hash, by key and by pattern (the tenant's compiled
//! [`Redaction`], see `policy::redaction`), and the tenant tag is written in.

use serde_json::{Map, Value};

use super::{CallRequest, Stage};
use crate::error::GatewayError;
pub use crate::policy::Redaction;

/// See the module docs.
#[derive(Debug, Default)]
pub struct Redact;

impl Stage for Redact {
    const NAME: &'static str = "redact";

    fn apply(&self, req: &mut CallRequest) -> Result<(), GatewayError> {
        let (tenant, call) = req.parts_mut()?;
        let metadata = call.metadata.get_or_insert_with(Map::new);
        tenant.redaction.apply(metadata);
        metadata.insert(
            tenant.metadata.tag_key().to_string(),
            Value::String(tenant.id.clone()),
        );
        Ok(())
    }
}

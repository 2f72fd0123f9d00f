//! Types that parse at the boundary, so the rest of the code never
//! re-validates: a [`Principal`] cannot hold a credential, a [`ResourceRef`]
//! always names a known resource type.

mod key_type;
mod operation;
mod principal;
mod resource;

/// The selector-to-SpiceDB-id encoding (its own crate, shared with
/// agentex-auth-dev).
pub use authz_object_id as object_id;
pub use key_type::ApiKeyType;
pub use operation::Operation;
pub use principal::IDENTITY_FIELDS;
pub use principal::{
    CREDENTIAL_NAMES, CREDENTIAL_WORDS, MAX_PRINCIPAL_VALUE_CHARS, Principal, PrincipalError,
    PrincipalPolicy, is_credential_key, names_a_creator, principal_from_setting,
};
pub use resource::{ResourceRef, ResourceRefError, ResourceType};

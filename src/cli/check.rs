//! `authz-outbox check`: asks SpiceDB whether a subject has a permission on
//! a resource — the "look in SpiceDB" step after delivery, with the ids
//! written the way the worker writes them.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use spicedb_grpc_tonic::v1::ObjectReference;

use super::{Secret, parse_secret};
use crate::spicedb_client::{SpiceDbClient, SpiceDbToken};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The resource, `TYPE:ID` (`document:roadmap`): the mapping's type and
    /// the row's selector, encoded as the worker encodes it.
    resource: String,
    /// The permission (or relation) to check, as the schema names it.
    permission: String,
    /// The subject, `TYPE:ID` (`user:alice`), its id encoded the same way.
    subject: String,
    /// SpiceDB's gRPC endpoint. `https://` is dialled with TLS.
    #[arg(long, env = "SPICEDB_ENDPOINT")]
    spicedb_endpoint: String,
    /// SpiceDB preshared key. Prefer the environment: a flag's value is
    /// visible in `ps`.
    #[arg(long, env = "SPICEDB_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    spicedb_token: Option<Secret>,
    /// PEM file of CA certificates trusted for an https:// endpoint.
    #[arg(long, env = "SPICEDB_CA_FILE")]
    spicedb_ca_file: Option<std::path::PathBuf>,
}

/// Prints `allowed` (exit 0) or `denied` (exit 1); 2 on an error.
pub async fn check_command(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let resource = object(&args.resource).context("resource")?;
    let subject = object(&args.subject).context("subject")?;
    if !is_name(&args.permission) {
        anyhow::bail!(
            "permission {:?} is not a SpiceDB relation or permission name",
            args.permission
        );
    }
    let ca_pem = args
        .spicedb_ca_file
        .as_deref()
        .map(crate::spicedb_client::read_ca_file)
        .transpose()?;
    let token = args
        .spicedb_token
        .as_ref()
        .and_then(|t| SpiceDbToken::new(t.0.clone()));
    super::warn_if_sent_in_clear(
        token.is_some(),
        "SPICEDB_ENDPOINT",
        "preshared key",
        &args.spicedb_endpoint,
    );
    let client = SpiceDbClient::with_ca(
        &args.spicedb_endpoint,
        token,
        Duration::from_secs(10),
        ca_pem.as_deref(),
    )?;
    let allowed = client
        .check(resource, &args.permission, subject)
        .await
        .map_err(|e| anyhow::anyhow!("SpiceDB at {}: {e}", client.endpoint()))?;
    if allowed {
        println!("allowed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("denied");
        Ok(ExitCode::from(1))
    }
}

/// `TYPE:ID`, the id in the worker's object-id encoding.
fn object(text: &str) -> anyhow::Result<ObjectReference> {
    let (object_type, id) = text
        .split_once(':')
        .with_context(|| format!("{text:?} is not TYPE:ID"))?;
    if !is_name(object_type) {
        anyhow::bail!("{object_type:?} is not a SpiceDB definition name");
    }
    let object_id = authz_object_id::encode(id).with_context(|| format!("id {id:?}"))?;
    Ok(ObjectReference {
        object_type: object_type.to_string(),
        object_id,
    })
}

/// SpiceDB's names: lower-case letters, digits and `_`, starting with a
/// letter, at most 64 characters (a `namespace/` prefix allowed).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.split('/').all(|part| {
            part.len() <= 64
                && part.starts_with(|c: char| c.is_ascii_lowercase())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_type_colon_id_with_the_id_encoded_as_the_worker_does() {
        let o = object("document:roadmap").expect("plain");
        assert_eq!(
            (o.object_type.as_str(), o.object_id.as_str()),
            ("document", "roadmap")
        );
        assert!(object("document").is_err(), "no id");
        assert!(object("Doc:x").is_err(), "not a definition name");
        assert!(object("document:").is_err(), "empty id");
        assert_eq!(
            object("document:a b").expect("encoded").object_id,
            authz_object_id::encode("a b").expect("encode")
        );
    }

    #[test]
    fn names_are_spicedbs() {
        assert!(is_name("view"));
        assert!(is_name("team/document"));
        assert!(!is_name("View"));
        assert!(!is_name("1view"));
        assert!(!is_name("view; drop"));
    }
}

//! The relay's replication connection: `START_REPLICATION` on the slot over
//! the streaming replication protocol, the two messages the walsender sends
//! in its CopyBoth stream (XLogData carrying one pgoutput message, and
//! keepalives) and the standby status update the relay sends back.
//!
//! The connection itself (the URL, TLS, SCRAM, the CopyBoth framing) is
//! `pg_walstream`'s pure-Rust one. Its stream layer is not used: on start it
//! creates a slot it does not find, which would turn a lost slot into a
//! silent gap, and it chooses by itself when to tell the walsender what is
//! flushed. Here the relay decides both.

use std::time::Duration;

use bytes::Bytes;
use pg_walstream::{CancellationToken, PgReplicationConnection, ReplicationError};

use super::{PUBLICATION, RelayError};

/// What the walsender said.
#[derive(Debug)]
pub enum Frame {
    /// One pgoutput message (a begin, a logical message, a commit, …).
    Data(Bytes),
    /// The walsender's send position: every transaction committed before it
    /// has been sent ahead of this message.
    Keepalive { wal_end: u64 },
}

/// A replication connection streaming the relay's slot.
pub struct Walsender {
    conn: PgReplicationConnection,
    /// Never cancelled: a read is abandoned by dropping it (see [`Self::next`]).
    never: CancellationToken,
    /// The furthest position the walsender has sent (its "write" position
    /// in the status update).
    received: u64,
    /// The last flush position reported.
    flushed: u64,
    /// A keepalive asked for an answer that is not sent yet.
    reply_owed: bool,
    slot: String,
    /// For redacting errors only.
    database_url: String,
}

/// `DATABASE_URL` with `replication=database`, or `None` when the
/// replication client cannot dial it (a Unix socket: the client speaks TCP
/// only). Everything else carries over, TLS settings (`sslmode`,
/// `sslrootcert`) and credentials included.
pub fn replication_url(database_url: &str) -> Option<String> {
    let mut url = url::Url::parse(database_url).ok()?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return None;
    }
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let socket_host = pairs
        .iter()
        .any(|(k, v)| (k == "host" || k == "hostaddr") && v.starts_with('/'));
    if socket_host || url.host_str().is_none_or(str::is_empty) {
        return None;
    }
    // sqlx's own knob; libpq (whose keywords the client checks) has none.
    pairs.retain(|(k, _)| k != "statement-cache-capacity" && k != "replication");
    pairs.push(("replication".into(), "database".into()));
    // The client connects synchronously: an unanswered dial must not hold
    // the relay (and a shutdown waiting for it) for the kernel's minutes.
    if !pairs.iter().any(|(k, _)| k == "connect_timeout") {
        pairs.push(("connect_timeout".into(), "10".into()));
    }
    url.query_pairs_mut().clear().extend_pairs(pairs);
    Some(url.into())
}

impl Walsender {
    /// Connects and starts streaming `slot` from its confirmed position.
    /// A slot dropped or invalidated is [`RelayError::SlotLost`]; one that
    /// another walsender streams is [`RelayError::SlotBusy`].
    pub async fn start(database_url: &str, slot: &str) -> Result<Self, RelayError> {
        let Some(url) = replication_url(database_url) else {
            return Err(RelayError::StreamUnavailable(
                "DATABASE_URL is not a TCP postgres:// URL".into(),
            ));
        };
        let classify = |e: ReplicationError| classify(e, slot, database_url);
        let mut conn = PgReplicationConnection::connect(&url).map_err(classify)?;
        let publication = format!("\"{PUBLICATION}\"");
        conn.start_replication(
            slot,
            0,
            &[
                ("proto_version", "1"),
                ("publication_names", &publication),
                ("messages", "true"),
            ],
        )
        .map_err(classify)?;
        Ok(Walsender {
            conn,
            never: CancellationToken::new(),
            received: 0,
            flushed: 0,
            reply_owed: false,
            slot: slot.to_string(),
            database_url: database_url.to_string(),
        })
    }

    /// The next message, or `None` when none arrives within `wait` (zero:
    /// only one already here). Dropping this future is safe: it only awaits
    /// the socket read (or, on a current-thread runtime, the channel from
    /// the connection's reader thread), which keeps what it has read for the
    /// next call. It never writes: an answer a keepalive asks for is sent by
    /// the next [`Self::confirm`].
    pub async fn next(&mut self, wait: Duration) -> Result<Option<Frame>, RelayError> {
        let read = self.conn.get_copy_data_async(&self.never);
        let data = match tokio::time::timeout(wait, read).await {
            Err(_) => return Ok(None),
            Ok(read) => read.map_err(|e| classify(e, &self.slot, &self.database_url))?,
        };
        match data.first() {
            // 'w', start (8), end (8), send time (8), then the message.
            Some(b'w') if data.len() >= 25 => {
                let end = u64::from_be_bytes(data[9..17].try_into().unwrap_or_default());
                self.received = self.received.max(end);
                Ok(Some(Frame::Data(data.slice(25..))))
            }
            Some(b'k') => {
                let k = pg_walstream::parse_keepalive_message(&data)
                    .map_err(|e| RelayError::Stream(e.to_string()))?;
                self.received = self.received.max(k.wal_end);
                self.reply_owed |= k.reply_requested;
                Ok(Some(Frame::Keepalive { wal_end: k.wal_end }))
            }
            _ => Err(RelayError::Stream(format!(
                "unexpected replication message {:?}",
                data.first().map(|&b| b as char)
            ))),
        }
    }

    /// Tells the walsender that everything before `flushed` is in the
    /// outbox (the slot's `confirmed_flush_lsn` follows), or repeats the
    /// last position when `flushed` is not past it.
    pub async fn confirm(&mut self, flushed: u64) -> Result<(), RelayError> {
        self.flushed = self.flushed.max(flushed);
        self.reply_owed = false;
        self.conn
            .send_standby_status_update(
                self.received.max(self.flushed),
                self.flushed,
                self.flushed,
                false,
            )
            .await
            .map_err(|e| classify(e, &self.slot, &self.database_url))
    }

    /// Whether a keepalive asked for a status update not sent yet.
    pub fn reply_owed(&self) -> bool {
        self.reply_owed
    }
}

/// What the relay does about a replication error: a lost slot is a gap, a
/// busy one is another reader's turn, a URL the client refuses is the SQL
/// path's to read; anything else is retried. The message never holds the
/// URL's password.
fn classify(e: ReplicationError, slot: &str, database_url: &str) -> RelayError {
    let message = crate::db::redact(&e.to_string(), database_url);
    match e {
        ReplicationError::ReplicationSlot(reason) => RelayError::SlotLost {
            slot: slot.to_string(),
            reason: crate::db::redact(&reason, database_url),
        },
        // "replication slot … is active for PID …": pg_walstream files
        // object_in_use among the transient errors, tagged with its code.
        ReplicationError::TransientConnection(ref m) if m.contains("[55006]") => {
            RelayError::SlotBusy(message)
        }
        ReplicationError::Config(_) => RelayError::StreamUnavailable(message),
        _ => RelayError::Stream(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_url_keeps_tls_and_credentials_and_asks_for_replication() {
        let url = replication_url(
            "postgres://u:p%40ss@db.internal:6432/app?sslmode=verify-full&sslrootcert=/ca.pem&statement-cache-capacity=10",
        )
        .expect("a TCP URL");
        assert_eq!(
            url,
            "postgres://u:p%40ss@db.internal:6432/app?sslmode=verify-full&sslrootcert=%2Fca.pem&replication=database&connect_timeout=10"
        );
        assert_eq!(
            replication_url("postgres://u@h/app?replication=true&connect_timeout=3").as_deref(),
            Some("postgres://u@h/app?connect_timeout=3&replication=database")
        );
    }

    #[test]
    fn a_unix_socket_url_is_left_to_the_sql_path() {
        assert_eq!(
            replication_url("postgres://u@localhost/app?host=/var/run/postgresql"),
            None
        );
        assert_eq!(replication_url("postgres:///app"), None);
        assert_eq!(replication_url("mysql://h/app"), None);
    }

    #[test]
    fn errors_say_what_the_relay_does_and_hide_the_password() {
        let url = "postgres://u:hunter2@h/app";
        let lost = classify(
            ReplicationError::ReplicationSlot(
                "[42704] replication slot \"s\" does not exist".into(),
            ),
            "s",
            url,
        );
        assert!(matches!(lost, RelayError::SlotLost { .. }), "{lost}");
        let busy = classify(
            ReplicationError::TransientConnection(
                "[55006] replication slot \"s\" is active for PID 7".into(),
            ),
            "s",
            url,
        );
        assert!(matches!(busy, RelayError::SlotBusy(_)), "{busy}");
        let other = classify(
            ReplicationError::Authentication(format!("bad password for {url}")),
            "s",
            url,
        );
        assert!(matches!(other, RelayError::Stream(_)), "{other}");
        assert!(!other.to_string().contains("hunter2"), "{other}");
    }
}

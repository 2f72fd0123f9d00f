//! The few pgoutput messages the relay reads (protocol version 1, one per
//! XLogData message of the replication stream, or one per row of
//! `pg_logical_slot_peek_binary_changes`): a
//! transaction's `B`egin, its logical `M`essages and its `C`ommit. Every
//! other message (relations, row changes of published tables: there are
//! none, the publication is empty) is skipped. Layouts: PostgreSQL's
//! "Logical Replication Message Formats".

use chrono::{DateTime, TimeZone, Utc};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message {kind:?} is {len} bytes, shorter than its fields")]
    Short { kind: char, len: usize },
    #[error("a pgoutput {0:?} message outside a transaction")]
    OutsideTransaction(char),
    #[error("a pgoutput transaction without its commit (the peek ended inside it)")]
    Unfinished,
}

/// One committed transaction's messages with our prefix, in emission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Its transaction id (32 bits, as pgoutput sends it).
    pub xid: u32,
    /// The end of its commit record: once the relay has inserted its rows,
    /// the slot may move here.
    pub end_lsn: u64,
    pub committed_at: DateTime<Utc>,
    pub messages: Vec<Vec<u8>>,
}

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

struct Reader<'a> {
    kind: char,
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(DecodeError::Short {
                kind: self.kind,
                len: self.data.len(),
            });
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstring(&mut self) -> Result<&'a [u8], DecodeError> {
        let rest = &self.data[self.at.min(self.data.len())..];
        match rest.iter().position(|&b| b == 0) {
            Some(n) => {
                let s = self.take(n)?;
                self.take(1)?;
                Ok(s)
            }
            None => Err(DecodeError::Short {
                kind: self.kind,
                len: self.data.len(),
            }),
        }
    }
}

fn timestamp(micros_since_2000: u64) -> DateTime<Utc> {
    let micros = (micros_since_2000 as i64).saturating_add(PG_EPOCH_MICROS);
    Utc.timestamp_micros(micros).single().unwrap_or_default()
}

/// Decodes pgoutput messages one at a time, as the walsender sends them:
/// a transaction comes out whole at its commit. Transactions without a
/// message of ours come out too (empty): the slot may still move past them.
#[derive(Debug)]
pub struct Decoder {
    prefix: Vec<u8>,
    /// The open transaction's xid and messages.
    open: Option<(u32, Vec<Vec<u8>>)>,
}

impl Decoder {
    pub fn new(prefix: &str) -> Self {
        Decoder {
            prefix: prefix.as_bytes().to_vec(),
            open: None,
        }
    }

    /// Whether a transaction has begun and not yet committed: until it
    /// does, nothing at or past its start may be confirmed.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Takes one message; returns the transaction its commit ends.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<Transaction>, DecodeError> {
        let Some(&first) = data.first() else {
            return Ok(None);
        };
        let kind = first as char;
        let mut r = Reader { kind, data, at: 1 };
        match kind {
            'B' => {
                r.u64()?; // final LSN
                r.u64()?; // commit time
                let xid = r.u32()?;
                self.open = Some((xid, Vec::new()));
            }
            'M' => {
                let flags = r.u8()?;
                r.u64()?; // the message's LSN
                let p = r.cstring()?;
                let len = r.u32()? as usize;
                let content = r.take(len)?;
                // Non-transactional messages are not ours (ours are emitted
                // with `transactional = true`) and arrive outside a B…C.
                if flags & 1 == 0 {
                    return Ok(None);
                }
                let Some((_, messages)) = self.open.as_mut() else {
                    return Err(DecodeError::OutsideTransaction(kind));
                };
                if p == self.prefix.as_slice() {
                    messages.push(content.to_vec());
                }
            }
            'C' => {
                r.u8()?; // flags
                r.u64()?; // commit LSN
                let end_lsn = r.u64()?;
                let committed_at = timestamp(r.u64()?);
                let Some((xid, messages)) = self.open.take() else {
                    return Err(DecodeError::OutsideTransaction(kind));
                };
                return Ok(Some(Transaction {
                    xid,
                    end_lsn,
                    committed_at,
                    messages,
                }));
            }
            _ => {}
        }
        Ok(None)
    }
}

/// Decodes a peek's rows into its committed transactions, keeping the
/// transactional messages whose prefix is `prefix`.
pub fn decode<'a>(
    rows: impl IntoIterator<Item = &'a [u8]>,
    prefix: &str,
) -> Result<Vec<Transaction>, DecodeError> {
    let mut decoder = Decoder::new(prefix);
    let mut out = Vec::new();
    for data in rows {
        out.extend(decoder.feed(data)?);
    }
    if decoder.in_transaction() {
        return Err(DecodeError::Unfinished);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin() -> Vec<u8> {
        let mut v = vec![b'B'];
        v.extend(100u64.to_be_bytes());
        v.extend(0u64.to_be_bytes());
        v.extend(7u32.to_be_bytes());
        v
    }

    fn message(prefix: &str, content: &[u8], transactional: bool) -> Vec<u8> {
        let mut v = vec![b'M', u8::from(transactional)];
        v.extend(90u64.to_be_bytes());
        v.extend(prefix.as_bytes());
        v.push(0);
        v.extend((content.len() as u32).to_be_bytes());
        v.extend(content);
        v
    }

    fn commit(end: u64) -> Vec<u8> {
        let mut v = vec![b'C', 0];
        v.extend(99u64.to_be_bytes());
        v.extend(end.to_be_bytes());
        v.extend(1_000_000u64.to_be_bytes());
        v
    }

    #[test]
    fn keeps_our_transactional_messages_in_order_per_transaction() {
        let rows = [
            begin(),
            message("authz_outbox", b"one", true),
            message("other", b"x", true),
            message("authz_outbox", b"two", true),
            commit(120),
            begin(),
            commit(130),
        ];
        let txs = decode(rows.iter().map(Vec::as_slice), "authz_outbox").expect("decodes");
        assert_eq!(txs.len(), 2);
        assert_eq!(txs[0].messages, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(txs[0].end_lsn, 120);
        assert_eq!(txs[0].committed_at.timestamp(), 946_684_801);
        assert!(txs[1].messages.is_empty());
        assert_eq!(txs[1].end_lsn, 130);
    }

    #[test]
    fn a_streamed_transaction_comes_out_at_its_commit() {
        let mut d = Decoder::new("authz_outbox");
        assert_eq!(d.feed(&begin()), Ok(None));
        assert!(d.in_transaction());
        assert_eq!(d.feed(&message("authz_outbox", b"one", true)), Ok(None));
        let tx = d
            .feed(&commit(120))
            .expect("decodes")
            .expect("a transaction");
        assert_eq!(
            (tx.xid, tx.end_lsn, tx.messages),
            (7, 120, vec![b"one".to_vec()])
        );
        assert!(!d.in_transaction());
        assert_eq!(
            d.feed(&commit(130)),
            Err(DecodeError::OutsideTransaction('C'))
        );
    }

    #[test]
    fn refuses_truncated_or_unfinished_input() {
        let mut short = message("authz_outbox", b"abc", true);
        short.truncate(short.len() - 1);
        let rows = [begin(), short];
        assert!(matches!(
            decode(rows.iter().map(Vec::as_slice), "authz_outbox"),
            Err(DecodeError::Short { kind: 'M', .. })
        ));
        let rows = [begin(), message("authz_outbox", b"a", true)];
        assert_eq!(
            decode(rows.iter().map(Vec::as_slice), "authz_outbox"),
            Err(DecodeError::Unfinished)
        );
        let rows = [message("authz_outbox", b"a", false)];
        assert_eq!(
            decode(rows.iter().map(Vec::as_slice), "authz_outbox").map(|t| t.len()),
            Ok(0)
        );
    }
}

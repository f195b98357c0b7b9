//! The stored form of an event: the canonical fields in fixed-width binary
//! (about 140–220 bytes) instead of the JSON transport form (450–600, all
//! hex). Values written before this form existed are JSON and still read:
//! a JSON value starts with `{`, a binary one with its kind byte (1–5).
//!
//! ```text
//! create  0x01 ‖ consumer 32 ‖ provider 32 ‖ vcpus u32 ‖ memory_mb u32 ‖ disk_gb u32
//!              ‖ duration u64 ‖ access key 32 ‖ created_at u64 ‖ nonce 16 ‖ sig 64
//! accept  0x02 ‖ lease 32 ‖ signer 32 ‖ accepted_at u64 ‖ len u16 ‖ host key ‖ sig 64
//! settle  0x03 ‖ lease 32 ‖ signer 32 ‖ at u64 ‖ sig 64
//! cancel  0x04 ‖ lease 32 ‖ signer 32 ‖ at u64 ‖ sig 64
//! decline 0x05 ‖ lease 32 ‖ signer 32 ‖ at u64 ‖ len u16 ‖ reason ‖ sig 64
//! ```
//!
//! Integers are big-endian, as in the signed encoding.
//!
//! Lease bundles (see `layout`) store these bytes too.

use crate::ids::{AccessPubKey, AccountAddress, AccountPubKey, LeaseHash, Sig};
use crate::lease::{Lease, LeaseEvent};

/// The stored bytes of an event.
pub fn encode_event(ev: &LeaseEvent) -> Vec<u8> {
    let mut b = Vec::with_capacity(224);
    let ended = |b: &mut Vec<u8>, tag: u8, h: &LeaseHash, s: &AccountPubKey, at: u64, sig: &Sig| {
        b.push(tag);
        b.extend_from_slice(&h.0);
        b.extend_from_slice(&s.0);
        b.extend_from_slice(&at.to_be_bytes());
        b.extend_from_slice(&sig.0);
    };
    match ev {
        LeaseEvent::Create { lease, sig } => {
            b.push(1);
            b.extend_from_slice(&lease.consumer.0);
            b.extend_from_slice(&lease.provider.0);
            b.extend_from_slice(&lease.vcpus.to_be_bytes());
            b.extend_from_slice(&lease.memory_mb.to_be_bytes());
            b.extend_from_slice(&lease.disk_gb.to_be_bytes());
            b.extend_from_slice(&lease.duration.to_be_bytes());
            b.extend_from_slice(&lease.access_pub_key.0);
            b.extend_from_slice(&lease.created_at.to_be_bytes());
            b.extend_from_slice(&lease.nonce);
            b.extend_from_slice(&sig.0);
        }
        LeaseEvent::Accept {
            lease_hash,
            signer,
            accepted_at,
            vm_host_key,
            sig,
        } => {
            b.push(2);
            b.extend_from_slice(&lease_hash.0);
            b.extend_from_slice(&signer.0);
            b.extend_from_slice(&accepted_at.to_be_bytes());
            text(&mut b, vm_host_key);
            b.extend_from_slice(&sig.0);
        }
        LeaseEvent::Decline {
            lease_hash,
            signer,
            at,
            reason,
            sig,
        } => {
            b.push(5);
            b.extend_from_slice(&lease_hash.0);
            b.extend_from_slice(&signer.0);
            b.extend_from_slice(&at.to_be_bytes());
            text(&mut b, reason);
            b.extend_from_slice(&sig.0);
        }
        LeaseEvent::Settle {
            lease_hash,
            signer,
            at,
            sig,
        } => ended(&mut b, 3, lease_hash, signer, *at, sig),
        LeaseEvent::Cancel {
            lease_hash,
            signer,
            at,
            sig,
        } => ended(&mut b, 4, lease_hash, signer, *at, sig),
    }
    b
}

/// `len u16 ‖ bytes`. check_self bounds every such field (host key 1 KiB,
/// reason 300 B) far below u16.
fn text(b: &mut Vec<u8>, t: &str) {
    let len = u16::try_from(t.len()).unwrap_or(u16::MAX);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&t.as_bytes()[..usize::from(len)]);
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if self.0.len() < N {
            return Err("truncated".into());
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&self.0[..N]);
        self.0 = &self.0[N..];
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take::<8>().map(u64::from_be_bytes)
    }
    fn text(&mut self, what: &str) -> Result<String, String> {
        let len = usize::from(u16::from_be_bytes(self.take()?));
        if self.0.len() < len {
            return Err(format!("truncated {what}"));
        }
        let t = String::from_utf8(self.0[..len].to_vec()).map_err(|e| e.to_string())?;
        self.0 = &self.0[len..];
        Ok(t)
    }
}

/// Read stored bytes (binary, or JSON from before).
pub fn decode_event(v: &[u8]) -> Result<LeaseEvent, String> {
    if v.first() == Some(&b'{') {
        return serde_json::from_slice(v).map_err(|e| e.to_string());
    }
    let (&tag, rest) = v.split_first().ok_or("empty value")?;
    let mut r = R(rest);
    let ev = match tag {
        1 => {
            let lease = Lease {
                consumer: AccountPubKey(r.take()?),
                provider: AccountAddress(r.take()?),
                vcpus: r.u32()?,
                memory_mb: r.u32()?,
                disk_gb: r.u32()?,
                duration: r.u64()?,
                access_pub_key: AccessPubKey(r.take()?),
                created_at: r.u64()?,
                nonce: r.take()?,
            };
            LeaseEvent::Create {
                lease,
                sig: Sig(r.take()?),
            }
        }
        2 => {
            let lease_hash = LeaseHash(r.take()?);
            let signer = AccountPubKey(r.take()?);
            let accepted_at = r.u64()?;
            let vm_host_key = r.text("host key")?;
            LeaseEvent::Accept {
                lease_hash,
                signer,
                accepted_at,
                vm_host_key,
                sig: Sig(r.take()?),
            }
        }
        3 | 4 => {
            let lease_hash = LeaseHash(r.take()?);
            let signer = AccountPubKey(r.take()?);
            let at = r.u64()?;
            let sig = Sig(r.take()?);
            if tag == 3 {
                LeaseEvent::Settle {
                    lease_hash,
                    signer,
                    at,
                    sig,
                }
            } else {
                LeaseEvent::Cancel {
                    lease_hash,
                    signer,
                    at,
                    sig,
                }
            }
        }
        5 => LeaseEvent::Decline {
            lease_hash: LeaseHash(r.take()?),
            signer: AccountPubKey(r.take()?),
            at: r.u64()?,
            reason: r.text("reason")?,
            sig: Sig(r.take()?),
        },
        t => return Err(format!("unknown event kind byte {t}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes", r.0.len()));
    }
    Ok(ev)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wallet::Wallet;

    pub(crate) const HOST_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

    /// A lease from consumer `c` to provider `p`, created at a fixed time.
    pub(crate) fn signed_create(c: &Wallet, p: &Wallet) -> LeaseEvent {
        LeaseEvent::create(
            c,
            Lease {
                consumer: c.public_key(),
                provider: p.address(),
                vcpus: 2,
                memory_mb: 1024,
                disk_gb: 10,
                duration: 3600,
                access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
                created_at: 1_700_000_000,
                nonce: [7; 16],
            },
        )
    }

    #[test]
    fn every_kind_round_trips_and_json_still_reads() {
        let c = Wallet::from_seed([1; 32]);
        let p = Wallet::from_seed([2; 32]);
        let create = signed_create(&c, &p);
        let h = create.lease_hash();
        let key = HOST_KEY;
        for ev in [
            create,
            LeaseEvent::accept(&p, h, 1_700_000_001, key.into()),
            LeaseEvent::settle(&c, h, 1_700_000_002),
            LeaseEvent::cancel(&c, h, 1_700_000_003),
            LeaseEvent::decline(
                &p,
                h,
                1_700_000_004,
                "over capacity: 4 vCPUs needed, 2 free",
            ),
        ] {
            let b = encode_event(&ev);
            assert!(b.len() < 260, "{} bytes", b.len());
            assert_eq!(decode_event(&b), Ok(ev.clone()));
            let json = serde_json::to_vec(&ev).expect("json");
            assert_eq!(decode_event(&json), Ok(ev.clone()));
            assert!(decode_event(&b[..b.len() - 1]).is_err());
        }
        assert!(decode_event(&[9, 0]).is_err());
        assert!(decode_event(&[]).is_err());
    }
}

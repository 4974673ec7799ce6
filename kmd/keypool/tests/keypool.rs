//! The key pool against real SoftHSM tokens: two simulated sites (A = lower side, B = upper
//! side), separate databases and tokens, fed the same blocks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kmd_keypool::{
    BlockState, KeyOrigin, KeyPool, KeyState, PeerKey, PoolError, Refusal, ReserveRequest, Segment, Side,
    Verdict, Zeroizing, block_owner,
};

fn sizes() -> Vec<u32> {
    vec![8, 16, 24, 64, 128, 256, 296, 512, 1024, 2048, 4096, 8184, 8192]
}

#[test]
fn round_trip_between_two_sites() {
    isolated("round_trip_between_two_sites", |env| {
        runtime().block_on(async {
            let a = env.site("a").await;
            let b = env.site("b").await;
            let (a_mail, b_mail, c_mail) = (sae("A-mail"), sae("B-mail"), sae("C-mail"));
            feed(&[&a, &b], 0..120).await;
            // Re-delivery by the device is a no-op.
            feed(&[&a], 0..10).await;

            // Unconfirmed blocks are never served.
            match a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 1, 256).await {
                Err(PoolError::Exhausted { available_bits: 0, requested_bits: 256 }) => {}
                other => panic!("expected Exhausted before confirmation, got {other:?}"),
            }
            let counts = a.counts(LINK).await.unwrap();
            assert_eq!(counts.available_bits_confirmed, 0);
            assert_eq!(counts.blocks.iter().map(|c| c.blocks).sum::<u64>(), 120);

            let (ab, ba) = confirm(&a, &b).await;
            assert_eq!((ab.confirmed, ab.discarded), (120, 0), "{ab:?}");
            assert_eq!(ba.confirmed, 0, "B's copies were confirmed while answering A: {ba:?}");
            let (ca, cb) = (a.counts(LINK).await.unwrap(), b.counts(LINK).await.unwrap());
            let total: u64 = (0..120).map(|n| block_len(n) as u64 * 8).sum();
            assert_eq!(ca.available_bits_confirmed, total);
            assert_eq!(cb.available_bits_confirmed, total);
            assert_eq!(ca.available_bits_owned + cb.available_bits_owned, total);
            assert!(ca.available_bits_owned > 0 && cb.available_bits_owned > 0);
            assert_eq!(a.stored_key_count(LINK, 256).await.unwrap(), ca.available_bits_owned / 256);

            // Invalid sizes and counts are refused before anything happens.
            for bad in [0u32, 7, 9, 255, 1001] {
                match a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 1, bad).await {
                    Err(PoolError::InvalidKeySize { size_bits, .. }) if size_bits == bad => {}
                    other => panic!("size {bad}: expected InvalidKeySize, got {other:?}"),
                }
            }
            assert!(matches!(
                a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 0, 256).await,
                Err(PoolError::Invalid { .. })
            ));
            assert!(matches!(
                a.reserve_keys(LINK, &a_mail, &[], 1, 256).await,
                Err(PoolError::Invalid { .. })
            ));
            assert!(matches!(
                a.reserve_keys("no-such-link", &a_mail, std::slice::from_ref(&b_mail), 1, 256).await,
                Err(PoolError::UnknownLink(_))
            ));

            // A (master A-mail) cuts keys of every size; B accepts them and serves B-mail.
            let mut all: Vec<PeerKey> = Vec::new();
            let mut spanning = 0;
            for size in sizes() {
                let grants =
                    a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 3, size).await.unwrap();
                assert_eq!(grants.len(), 3);
                for g in &grants {
                    assert_eq!(g.key.len() * 8, size as usize);
                    assert_eq!(g.assignment.size_bits(), u64::from(size));
                    if g.key.len() >= 4 {
                        let bytes = format!("{:?}", &g.key[..4]);
                        assert!(
                            !format!("{g:?}").contains(bytes.trim_matches(['[', ']'])),
                            "key bytes in Debug"
                        );
                    }
                    for s in &g.assignment.segments {
                        assert_eq!(block_owner(&s.block_id), Side::Lower, "A cut a block it does not own");
                    }
                    if g.assignment.segments.len() > 1 {
                        spanning += 1;
                    }
                }
                let assignments: Vec<PeerKey> = grants.iter().map(|g| g.assignment.clone()).collect();
                let out = b.accept_peer_assignment(LINK, assignments.clone()).await.unwrap();
                assert_eq!((out.accepted, out.already_present), (3, 0));
                // A retried sync neither fails nor duplicates.
                let again = b.accept_peer_assignment(LINK, assignments.clone()).await.unwrap();
                assert_eq!((again.accepted, again.already_present), (0, 3));

                let ids: Vec<String> = grants.iter().map(|g| g.key_id().to_owned()).collect();
                // Wrong slave, wrong master: 401, nothing delivered.
                match b.take_for_decryption(&c_mail, &a_mail, ids.clone()).await {
                    Err(PoolError::NotAuthorised { sae, key_ids }) => {
                        assert_eq!(sae, "C-mail");
                        assert_eq!(key_ids, ids);
                    }
                    other => panic!("expected NotAuthorised, got {other:?}"),
                }
                assert!(matches!(
                    b.take_for_decryption(&b_mail, &c_mail, ids.clone()).await,
                    Err(PoolError::NotAuthorised { .. })
                ));
                // Keys cut at A are never served for decryption at A.
                assert!(matches!(
                    a.take_for_decryption(&b_mail, &a_mail, ids.clone()).await,
                    Err(PoolError::NotFound(_))
                ));
                let got = b.take_for_decryption(&b_mail, &a_mail, ids.clone()).await.unwrap();
                for (g, d) in grants.iter().zip(&got) {
                    assert_eq!(g.key_id(), d.key_id);
                    assert_eq!(&g.key[..], &d.key[..], "site B's key differs from site A's");
                }
                match b.take_for_decryption(&b_mail, &a_mail, ids.clone()).await {
                    Err(PoolError::NotFound(missing)) => assert_eq!(missing, ids),
                    other => panic!("second take: expected NotFound, got {other:?}"),
                }
                a.mark_delivered_for_encryption(&a_mail, ids.clone()).await.unwrap();
                assert!(matches!(
                    a.mark_delivered_for_encryption(&a_mail, ids.clone()).await,
                    Err(PoolError::AlreadyDelivered(_))
                ));
                let info = b.key_info(&ids[0]).await.unwrap().unwrap();
                assert_eq!((info.origin, info.state), (KeyOrigin::Peer, KeyState::Delivered));
                all.extend(assignments);
            }
            assert!(spanning > 0, "no key spanned two blocks");
            // A's NotFound lists exactly the unknown keys; mixed with valid ones nothing is taken.
            let unknown = "00000000-0000-4000-8000-000000000000".to_owned();
            match b.take_for_decryption(&b_mail, &a_mail, vec![unknown.clone()]).await {
                Err(PoolError::NotFound(m)) => assert_eq!(m, vec![unknown.clone()]),
                other => panic!("{other:?}"),
            }

            // The other direction: B cuts for B-mail → A-mail, A serves A-mail.
            let grants = b.reserve_keys(LINK, &b_mail, std::slice::from_ref(&a_mail), 5, 256).await.unwrap();
            for g in &grants {
                for s in &g.assignment.segments {
                    assert_eq!(block_owner(&s.block_id), Side::Upper);
                }
            }
            let assignments: Vec<PeerKey> = grants.iter().map(|g| g.assignment.clone()).collect();
            a.accept_peer_assignment(LINK, assignments.clone()).await.unwrap();
            let ids: Vec<String> = grants.iter().map(|g| g.key_id().to_owned()).collect();
            // All or nothing: one unknown ID, nothing delivered.
            let mut with_unknown = ids.clone();
            with_unknown.push(unknown.clone());
            match a.take_for_decryption(&a_mail, &b_mail, with_unknown).await {
                Err(PoolError::NotFound(m)) => assert_eq!(m, vec![unknown.clone()]),
                other => panic!("{other:?}"),
            }
            let got = a.take_for_decryption(&a_mail, &b_mail, ids.clone()).await.unwrap();
            for (g, d) in grants.iter().zip(&got) {
                assert_eq!(&g.key[..], &d.key[..]);
            }
            all.extend(assignments);

            // Refusals name the key and the block.
            let owned_by_b = all
                .iter()
                .flat_map(|k| &k.segments)
                .find(|s| block_owner(&s.block_id) == Side::Upper)
                .unwrap();
            let bogus = |segments: Vec<Segment>| PeerKey {
                key_id: "11111111-2222-4333-8444-555555555555".into(),
                master: a_mail.clone(),
                slaves: vec![b_mail.clone()],
                segments,
            };
            let refusal = |r: Result<_, PoolError>| match r {
                Err(PoolError::AssignmentRefused { key_id, reason }) => {
                    assert_eq!(key_id, "11111111-2222-4333-8444-555555555555");
                    reason
                }
                other => panic!("expected a refusal, got {other:?}"),
            };
            let r = refusal(b.accept_peer_assignment(LINK, vec![bogus(vec![owned_by_b.clone()])]).await);
            assert!(matches!(r, Refusal::BlockOwnedHere { .. } | Refusal::BlockUnusable { .. }), "{r}");
            let r = refusal(
                b.accept_peer_assignment(
                    LINK,
                    vec![bogus(vec![Segment { block_id: "9999".into(), offset: 0, len: 4 }])],
                )
                .await,
            );
            assert_eq!(r, Refusal::BlockNotHeld { block_id: "9999".into() });
            let lower_live =
                (0..120u64).map(|n| n.to_string()).rfind(|id| block_owner(id) == Side::Lower).unwrap();
            let len = block_len(lower_live.parse().unwrap()) as u32;
            let r = refusal(
                b.accept_peer_assignment(
                    LINK,
                    vec![bogus(vec![Segment { block_id: lower_live.clone(), offset: len - 2, len: 4 }])],
                )
                .await,
            );
            assert!(matches!(r, Refusal::OutOfRange { .. }), "{r}");
            let used =
                all.iter().rev().find(|k| block_owner(&k.segments[0].block_id) == Side::Lower).unwrap();
            let mut overlapping = used.segments.last().unwrap().clone();
            overlapping.len = 1;
            let r = refusal(b.accept_peer_assignment(LINK, vec![bogus(vec![overlapping])]).await);
            match r {
                Refusal::Overlap { other_key_id, .. } => assert_eq!(other_key_id, used.key_id),
                Refusal::BlockUnusable { state: BlockState::Consumed, .. } => {}
                r => panic!("expected Overlap, got {r}"),
            }
            let mut conflicting = used.clone();
            conflicting.slaves = vec![c_mail.clone()];
            let r = b.accept_peer_assignment(LINK, vec![conflicting]).await;
            assert!(
                matches!(&r, Err(PoolError::AssignmentRefused { reason: Refusal::Conflicting, .. })),
                "{r:?}"
            );

            // Exhaustion is all or nothing.
            let before = a.counts(LINK).await.unwrap();
            let avail = before.available_bits_owned;
            let big = 8192u32;
            let too_many = (avail / u64::from(big) + 1) as u32;
            match a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), too_many, big).await {
                Err(PoolError::Exhausted { requested_bits, available_bits }) => {
                    assert_eq!(requested_bits, u64::from(too_many) * u64::from(big));
                    assert_eq!(available_bits, avail);
                }
                other => panic!("expected Exhausted, got {other:?}"),
            }
            assert_eq!(a.counts(LINK).await.unwrap(), before, "a refused request changed the pool");
            let mut drained = Vec::new();
            if too_many > 1 {
                drained.extend(
                    a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), too_many - 1, big)
                        .await
                        .unwrap(),
                );
            }
            let rest = a.counts(LINK).await.unwrap().available_bits_owned;
            assert!(rest < u64::from(big));
            if rest > 0 {
                drained.extend(
                    a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 1, rest as u32)
                        .await
                        .unwrap(),
                );
            }
            assert!(matches!(
                a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 1, 8).await,
                Err(PoolError::Exhausted { available_bits: 0, .. })
            ));
            let after = a.counts(LINK).await.unwrap();
            assert_eq!(after.available_bits_owned, 0);
            assert!(
                after
                    .blocks
                    .iter()
                    .all(|c| !(c.owned_here && c.state == BlockState::Confirmed && c.blocks > 0))
            );
            all.extend(drained.iter().map(|g| g.assignment.clone()));
            // B can still serve its own half.
            assert!(b.counts(LINK).await.unwrap().available_bits_owned > 0);

            assert_disjoint(&all);
            // Keys of the pair are counted.
            let pairs = b.counts(LINK).await.unwrap().pairs;
            assert!(pairs.iter().any(|p| p.origin == KeyOrigin::Peer
                && p.master == a_mail
                && p.slave == b_mail
                && p.state == KeyState::Delivered
                && p.keys == 3 * sizes().len() as u64));
            assert_integrity(&a).await;
            assert_integrity(&b).await;

            // History pruning keeps everything consistent and never lets a pruned key back in.
            let before = b.counts(LINK).await.unwrap();
            let mut held = Vec::new();
            for k in all.iter().filter(|k| block_owner(&k.segments[0].block_id) == Side::Lower) {
                if b.key_info(&k.key_id).await.unwrap().is_some() {
                    held.push(k.clone());
                }
            }
            let (keys, blocks) = b.prune_history(LINK, Duration::ZERO).await.unwrap();
            assert!(keys > 0 && blocks > 0, "pruned {keys} keys, {blocks} blocks");
            let after = b.counts(LINK).await.unwrap();
            assert_eq!(after.available_bits_owned, before.available_bits_owned);
            assert_integrity(&b).await;
            let mut retried = 0;
            for k in &held {
                if b.key_info(&k.key_id).await.unwrap().is_none() {
                    let r = b.accept_peer_assignment(LINK, vec![k.clone()]).await;
                    assert!(matches!(r, Err(PoolError::AssignmentRefused { .. })), "{r:?}");
                    retried += 1;
                }
            }
            assert!(retried > 0);
        });
    });
}

#[test]
fn mismatched_and_unconfirmed_blocks_are_never_served() {
    isolated("mismatched_and_unconfirmed_blocks_are_never_served", |env| {
        runtime().block_on(async {
            let a = env.site("a").await;
            let b = env.site("b").await;
            let (a_mail, b_mail) = (sae("A-mail"), sae("B-mail"));
            // Blocks 0..40 at both; block 7 and 8 differ at B (other bytes → other KCV); 40..50 only at A.
            let lower: Vec<u64> = (0..40).filter(|n| block_owner(&n.to_string()) == Side::Lower).collect();
            let (bad1, bad2) = (lower[1], lower[2]);
            feed(&[&a], 0..50).await;
            let blocks: Vec<_> = (0..40)
                .map(|n| {
                    let mut blk = new_block(n);
                    if n == bad1 || n == bad2 {
                        let mut other = blk.key.to_vec();
                        other[3] ^= 0x40;
                        blk.kcv = kcv(&other);
                        blk.key = Zeroizing::new(other);
                    }
                    blk
                })
                .collect();
            b.insert_blocks(LINK, blocks).await.unwrap();

            // The device re-sending a known block ID with another KCV is refused.
            let mut clash = new_block(3);
            clash.kcv[0] ^= 1;
            assert!(matches!(a.insert_blocks(LINK, vec![clash]).await, Err(PoolError::BlockConflict { .. })));

            let (ab, _) = confirm(&a, &b).await;
            assert_eq!(ab.discarded, 2, "{ab:?}");
            assert_eq!(ab.still_unconfirmed, 10, "{ab:?}");
            for pool in [&a, &b] {
                let counts = pool.counts(LINK).await.unwrap();
                let discarded: u64 =
                    counts.blocks.iter().filter(|c| c.state == BlockState::Discarded).map(|c| c.blocks).sum();
                assert_eq!(discarded, 2, "{counts:?}");
            }
            // A block confirmed later is not served before.
            let stale_ids: HashSet<String> = (40..50).map(|n| n.to_string()).collect();
            let forbidden: HashSet<String> =
                stale_ids.iter().cloned().chain([bad1.to_string(), bad2.to_string()]).collect();

            let mut keys = Vec::new();
            loop {
                match a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 1, 512).await {
                    Ok(g) => keys.extend(g),
                    Err(PoolError::Exhausted { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(!keys.is_empty());
            for k in &keys {
                for s in &k.assignment.segments {
                    assert!(!forbidden.contains(&s.block_id), "block {} was served", s.block_id);
                }
            }
            // The peer refuses keys from a block it discarded.
            let refused = b
                .accept_peer_assignment(
                    LINK,
                    vec![PeerKey {
                        key_id: "21111111-2222-4333-8444-555555555555".into(),
                        master: a_mail.clone(),
                        slaves: vec![b_mail.clone()],
                        segments: vec![Segment { block_id: bad1.to_string(), offset: 0, len: 8 }],
                    }],
                )
                .await;
            assert!(matches!(
                refused,
                Err(PoolError::AssignmentRefused {
                    reason: Refusal::BlockUnusable { state: BlockState::Discarded, .. },
                    ..
                })
            ));

            // Blocks the peer never confirms are dropped after the grace period.
            assert_eq!(a.discard_stale(LINK, Duration::from_secs(3600)).await.unwrap(), 0);
            assert_eq!(a.discard_stale(LINK, Duration::ZERO).await.unwrap(), 10);
            assert!(a.unconfirmed_blocks(LINK, 100).await.unwrap().is_empty());
            // Asking about them now yields Mismatch at A (discarded) so B would drop its copies too.
            let answers = a
                .check_peer_blocks(
                    LINK,
                    vec![kmd_keypool::BlockCheck { block_id: "45".into(), kcv: new_block(45).kcv }],
                )
                .await
                .unwrap();
            assert_eq!(answers, vec![("45".to_owned(), Verdict::Mismatch)]);
            assert_integrity(&a).await;
            assert_integrity(&b).await;
        });
    });
}

#[test]
fn concurrent_reservations_at_both_sites_never_share_a_byte() {
    isolated("concurrent_reservations_at_both_sites_never_share_a_byte", |env| {
        runtime().block_on(async {
            let a = env.site("a").await;
            let b = env.site("b").await;
            feed(&[&a, &b], 0..300).await;
            confirm(&a, &b).await;

            // 8 tasks per side, 100 keys each (10 calls × 10 keys), both sides at once.
            let mut tasks = Vec::new();
            for (pool, master, slave) in [(&a, "A-mail", "B-mail"), (&b, "B-mail", "A-mail")] {
                for t in 0..8 {
                    let pool = pool.clone();
                    let (master, slave) = (sae(master), sae(slave));
                    tasks.push(tokio::spawn(async move {
                        let mut out = Vec::new();
                        for call in 0..10 {
                            let size = [256u32, 128, 512, 8][(t + call) % 4];
                            let grants = pool
                                .reserve_keys(LINK, &master, std::slice::from_ref(&slave), 10, size)
                                .await
                                .unwrap();
                            out.extend(grants);
                        }
                        (master, out)
                    }));
                }
            }
            let mut by_site: HashMap<String, Vec<kmd_keypool::KeyGrant>> = HashMap::new();
            for t in tasks {
                let (master, grants) = t.await.unwrap();
                by_site.entry(master.to_string()).or_default().extend(grants);
            }
            let a_keys = &by_site["A-mail"];
            let b_keys = &by_site["B-mail"];
            assert_eq!(a_keys.len(), 800);
            assert_eq!(b_keys.len(), 800);
            let n = assert_disjoint(a_keys.iter().chain(b_keys.iter()).map(|g| &g.assignment));
            assert_eq!(n, 1600);

            // Each site accepts the other's keys, concurrently, in batches.
            let mut tasks = Vec::new();
            for (pool, keys) in [(&b, a_keys), (&a, b_keys)] {
                for chunk in keys.chunks(100) {
                    let pool = pool.clone();
                    let batch: Vec<PeerKey> = chunk.iter().map(|g| g.assignment.clone()).collect();
                    tasks.push(tokio::spawn(async move {
                        pool.accept_peer_assignment(LINK, batch).await.unwrap()
                    }));
                }
            }
            for t in tasks {
                assert_eq!(t.await.unwrap().accepted, 100);
            }

            // Four tasks race to take every key of A at B: each key goes out exactly once.
            let ids: Vec<String> = a_keys.iter().map(|g| g.key_id().to_owned()).collect();
            let expected: HashMap<String, Vec<u8>> =
                a_keys.iter().map(|g| (g.key_id().to_owned(), g.key.to_vec())).collect();
            let mut racers = Vec::new();
            for r in 0..4 {
                let (pool, ids) = (b.clone(), ids.clone());
                racers.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    for (i, id) in ids.iter().enumerate() {
                        let id = if r % 2 == 0 { id.clone() } else { ids[ids.len() - 1 - i].clone() };
                        match pool.take_for_decryption(&sae("B-mail"), &sae("A-mail"), vec![id.clone()]).await
                        {
                            Ok(mut keys) => got.push((id, keys.pop().unwrap().key.to_vec())),
                            Err(PoolError::NotFound(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    got
                }));
            }
            let mut served: HashMap<String, usize> = HashMap::new();
            for r in racers {
                for (id, key) in r.await.unwrap() {
                    assert_eq!(key, expected[&id]);
                    *served.entry(id).or_default() += 1;
                }
            }
            assert_eq!(served.len(), 800);
            assert!(served.values().all(|&n| n == 1), "a key was served twice");
            assert_integrity(&a).await;
            assert_integrity(&b).await;
        });
    });
}

#[test]
fn no_raw_key_bytes_reach_the_disk() {
    isolated("no_raw_key_bytes_reach_the_disk", |env| {
        runtime().block_on(async {
            let a = env.site("a").await;
            let b = env.site("b").await;
            let (a_mail, b_mail) = (sae("A-mail"), sae("B-mail"));
            let range = 0..60u64;
            let mut secrets: Vec<Vec<u8>> = range.clone().map(|n| block_bytes(n, block_len(n))).collect();
            feed(&[&a, &b], range).await;
            confirm(&a, &b).await;
            for (round, size) in [256u32, 8192, 128, 1024, 256].into_iter().enumerate() {
                let grants =
                    a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 4, size).await.unwrap();
                b.accept_peer_assignment(LINK, grants.iter().map(|g| g.assignment.clone()).collect())
                    .await
                    .unwrap();
                secrets.extend(grants.iter().map(|g| g.key.to_vec()));
                // Leave the last round assigned (wrapped material still stored).
                if round < 4 {
                    let ids: Vec<String> = grants.iter().map(|g| g.key_id().to_owned()).collect();
                    for d in b.take_for_decryption(&b_mail, &a_mail, ids.clone()).await.unwrap() {
                        secrets.push(d.key.to_vec());
                    }
                    a.mark_delivered_for_encryption(&a_mail, ids).await.unwrap();
                }
            }
            let grants = b.reserve_keys(LINK, &b_mail, std::slice::from_ref(&a_mail), 8, 256).await.unwrap();
            secrets.extend(grants.iter().map(|g| g.key.to_vec()));

            let mut windows: HashSet<[u8; 16]> = HashSet::new();
            for s in &secrets {
                for w in s.windows(16) {
                    windows.insert(w.try_into().unwrap());
                }
            }
            assert!(windows.len() > 10_000);
            // Files under the test directory (databases, WAL, SHM, token directory) holding any
            // 16-byte window of a secret.
            let leaks = || -> (Vec<String>, usize, Vec<String>) {
                let files = read_tree(&env.dir);
                let names = files
                    .iter()
                    .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect();
                let mut scanned = 0usize;
                let mut found = Vec::new();
                for (path, bytes) in &files {
                    scanned += bytes.len();
                    if bytes.windows(16).any(|w| windows.contains(<&[u8; 16]>::try_from(w).unwrap())) {
                        found.push(path.display().to_string());
                    }
                }
                (names, scanned, found)
            };
            let scan = |when: &str| {
                let (names, scanned, found) = leaks();
                assert!(names.iter().any(|n| n == "a.sqlite-wal") || when == "after close", "{names:?}");
                assert!(found.is_empty(), "{when}: raw key bytes found in {found:?}");
                assert!(scanned > 100_000, "{when}: only {scanned} bytes scanned");
                println!("{when}: scanned {} files, {scanned} bytes: {names:?}", names.len());
            };
            // Positive control: the scan does find a secret that is on disk.
            let control = env.dir.join("control.bin");
            let mut planted = vec![0u8; 1000];
            planted.extend_from_slice(&secrets[7][100..140]);
            std::fs::write(&control, &planted).unwrap();
            assert_eq!(leaks().2, vec![control.display().to_string()], "the scan missed planted key bytes");
            std::fs::remove_file(&control).unwrap();
            scan("while open");
            a.checkpoint().await.unwrap();
            scan("after checkpoint");
            a.close().await.unwrap();
            b.close().await.unwrap();
            scan("after close");
        });
    });
}

/// Crash safety: a child process reserves keys (or takes keys) in a loop and is killed with
/// SIGKILL at an arbitrary moment; after reopening, everything it reported is there exactly
/// once, and nothing is ever served twice.
#[test]
fn keys_survive_kill_9() {
    isolated("keys_survive_kill_9", |env| {
        if let Ok(mode) = std::env::var("KMD_KEYPOOL_CRASH_WORKER") {
            runtime().block_on(crash_worker(env, &mode));
            return;
        }
        let rt = runtime();
        let (a_mail, b_mail) = (sae("A-mail"), sae("B-mail"));
        rt.block_on(async {
            let a = env.site("a").await;
            let b = env.site("b").await;
            feed(&[&a, &b], 0..800).await;
            confirm(&a, &b).await;
            a.close().await.unwrap();
            b.close().await.unwrap();
        });

        // Reservations at A, killed four times at different moments.
        let mut reported: Vec<PeerKey> = Vec::new();
        for (round, kill_after) in [7usize, 40, 1, 150].into_iter().enumerate() {
            let lines = run_and_kill(env, "reserve", kill_after);
            let keys: Vec<PeerKey> =
                lines.iter().filter_map(|l| parse_key_line(l, &a_mail, &b_mail)).collect();
            assert!(keys.len() >= kill_after, "round {round}: only {} keys reported", keys.len());
            reported.extend(keys);
            rt.block_on(async {
                let a = env.site("a").await;
                let stored = a.pending_local_keys(LINK, 1_000_000).await.unwrap().len();
                println!(
                    "round {round}: killed after {kill_after} reports; {} keys reported so far, {stored} stored",
                    reported.len()
                );
                for k in &reported {
                    let info = a
                        .key_info(&k.key_id)
                        .await
                        .unwrap()
                        .unwrap_or_else(|| panic!("key {} lost", k.key_id));
                    assert_eq!(info.state, KeyState::Assigned);
                    assert_eq!(&info.assignment, k, "key {} changed", k.key_id);
                }
                assert_integrity(&a).await;
                a.close().await.unwrap();
            });
        }
        let stored = rt.block_on(async {
            let a = env.site("a").await;
            let pending = a.pending_local_keys(LINK, 1_000_000).await.unwrap();
            assert!(pending.len() >= reported.len());
            assert_disjoint(&pending);
            let reported_ids: HashSet<&str> = reported.iter().map(|k| k.key_id.as_str()).collect();
            let stored_ids: HashSet<&str> = pending.iter().map(|k| k.key_id.as_str()).collect();
            assert!(reported_ids.is_subset(&stored_ids));
            // Counts agree with the keys: every cut byte belongs to exactly one key.
            let counts = a.counts(LINK).await.unwrap();
            let key_bits: u64 = counts.keys.iter().map(|k| k.bits).sum();
            let owned_total: u64 = (0..800u64)
                .filter(|n| block_owner(&n.to_string()) == Side::Lower)
                .map(|n| block_len(n) as u64 * 8)
                .sum();
            assert_eq!(counts.available_bits_owned + key_bits, owned_total);
            // New keys after the crashes do not overlap the old ones.
            let fresh = a.reserve_keys(LINK, &a_mail, std::slice::from_ref(&b_mail), 20, 256).await.unwrap();
            assert_disjoint(pending.iter().chain(fresh.iter().map(|g| &g.assignment)));
            assert_integrity(&a).await;
            let mut all = pending;
            all.extend(fresh.into_iter().map(|g| g.assignment.clone()));
            a.close().await.unwrap();

            let b = env.site("b").await;
            for chunk in all.chunks(200) {
                b.accept_peer_assignment(LINK, chunk.to_vec()).await.unwrap();
            }
            b.close().await.unwrap();
            all
        });
        let ids: Vec<&str> = stored.iter().map(|k| k.key_id.as_str()).collect();
        std::fs::write(env.dir.join("peer-keys.txt"), ids.join("\n")).unwrap();

        // Takes at B, killed at different moments: what was reported taken never comes again.
        let mut taken: HashSet<String> = HashSet::new();
        for kill_after in [5usize, 60, 1] {
            let lines = run_and_kill(env, "take", kill_after);
            for l in &lines {
                if let Some(id) = l.strip_prefix("TOOK ") {
                    assert!(taken.insert(id.to_owned()), "key {id} was taken twice");
                }
            }
            rt.block_on(async {
                let b = env.site("b").await;
                for id in &taken {
                    match b.take_for_decryption(&b_mail, &a_mail, vec![id.clone()]).await {
                        Err(PoolError::NotFound(_)) => {}
                        other => panic!("key {id} taken before the crash was served again: {other:?}"),
                    }
                }
                assert_integrity(&b).await;
                b.close().await.unwrap();
            });
        }
        rt.block_on(async {
            let b = env.site("b").await;
            let mut second_chance = 0;
            for k in &stored {
                if taken.contains(&k.key_id) {
                    continue;
                }
                // Either never taken (served now) or taken by a killed child after its last report.
                match b.take_for_decryption(&b_mail, &a_mail, vec![k.key_id.clone()]).await {
                    Ok(_) => second_chance += 1,
                    Err(PoolError::NotFound(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(second_chance > 0);
            let counts = b.counts(LINK).await.unwrap();
            let assigned =
                counts.keys.iter().find(|k| k.origin == KeyOrigin::Peer && k.state == KeyState::Assigned);
            assert!(assigned.is_none_or(|k| k.keys == 0), "{counts:?}");
            assert_integrity(&b).await;
        });
    });
}

/// Starts the crash worker in `mode`, kills it (SIGKILL) once it has reported `kill_after`
/// lines, and returns every complete line it wrote.
fn run_and_kill(env: &TestEnv, mode: &str, kill_after: usize) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["keys_survive_kill_9", "--exact", "--nocapture", "--test-threads=1"])
        .env("KMD_KEYPOOL_CRASH_WORKER", mode)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(env.dir.join(format!("worker-{mode}.log"))).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "crash worker ({mode}) exited early after {} lines: {lines:?}", lines.len());
        assert!(Instant::now() < deadline, "crash worker too slow");
        if line.ends_with('\n') && (line.starts_with("KEY ") || line.starts_with("TOOK ")) {
            lines.push(line.trim_end().to_owned());
            if lines.len() >= kill_after {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Lines written before the kill.
    let mut rest = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.ends_with('\n') => lines.push(line.trim_end().to_owned()),
            Ok(_) => rest.push_str(&line),
        }
    }
    lines
}

async fn crash_worker(env: &TestEnv, mode: &str) {
    let mut out = std::io::stdout();
    match mode {
        "reserve" => {
            let a = env.site("a").await;
            let mut n = 0u32;
            loop {
                n += 1;
                let count = 1 + n % 4;
                let size = [256u32, 1024, 64, 8192][(n % 4) as usize];
                let grants =
                    a.reserve_keys(LINK, &sae("A-mail"), &[sae("B-mail")], count, size).await.unwrap();
                for g in grants {
                    let segs: Vec<String> = g
                        .assignment
                        .segments
                        .iter()
                        .map(|s| format!("{}:{}:{}", s.block_id, s.offset, s.len))
                        .collect();
                    writeln!(out, "KEY {} {}", g.key_id(), segs.join(",")).unwrap();
                }
                out.flush().unwrap();
            }
        }
        "take" => {
            let b = env.site("b").await;
            let ids = std::fs::read_to_string(env.dir.join("peer-keys.txt")).unwrap();
            for id in ids.lines() {
                match b.take_for_decryption(&sae("B-mail"), &sae("A-mail"), vec![id.to_owned()]).await {
                    Ok(_) => {
                        writeln!(out, "TOOK {id}").unwrap();
                        out.flush().unwrap();
                    }
                    Err(PoolError::NotFound(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            writeln!(out, "DONE").unwrap();
            out.flush().unwrap();
            std::future::pending::<()>().await;
        }
        other => panic!("unknown worker mode {other}"),
    }
}

fn parse_key_line(line: &str, master: &kmd_keypool::SaeId, slave: &kmd_keypool::SaeId) -> Option<PeerKey> {
    let rest = line.strip_prefix("KEY ")?;
    let (id, segs) = rest.split_once(' ')?;
    let segments = segs
        .split(',')
        .map(|s| {
            let mut p = s.split(':');
            Segment {
                block_id: p.next().unwrap().to_owned(),
                offset: p.next().unwrap().parse().unwrap(),
                len: p.next().unwrap().parse().unwrap(),
            }
        })
        .collect();
    Some(PeerKey { key_id: id.to_owned(), master: master.clone(), slaves: vec![slave.clone()], segments })
}

#[test]
fn links_keep_their_side_and_foreign_files_are_refused() {
    isolated("links_keep_their_side_and_foreign_files_are_refused", |env| {
        runtime().block_on(async {
            let a = env.site("a").await;
            assert!(matches!(a.register_link(LINK, Side::Upper).await, Err(PoolError::SideChanged { .. })));
            a.register_link(LINK, Side::Lower).await.unwrap();
            a.close().await.unwrap();

            let foreign = env.dir.join("foreign.sqlite");
            {
                use sqlx::Connection;
                let mut conn =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", foreign.display()))
                        .await
                        .unwrap();
                sqlx::raw_sql("CREATE TABLE mail (id INTEGER)").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
            let hsm = env.hsm(SITE_A_TOKEN).await;
            match KeyPool::open(kmd_keypool::PoolConfig::new(&foreign), hsm).await {
                Err(PoolError::NotAKeyPool(p)) => assert_eq!(p, foreign),
                other => panic!("expected NotAKeyPool, got {other:?}"),
            }
            let meta = std::fs::metadata(env.db_path("a")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o077, 0, "the database is readable by others");
        });
    });
}

/// A batched reservation (kmd's group commit of concurrent `enc_keys`) is one transaction that
/// serves its requests in order, each all or nothing: a request the material left after the
/// earlier ones cannot cover fails alone, an invalid one fails alone, and the keys of the others
/// are disjoint, accepted at the peer and fetched there with the same bytes.
#[test]
fn batched_reservation_serves_each_request_all_or_nothing() {
    isolated("batched_reservation_serves_each_request_all_or_nothing", |env| {
        runtime().block_on(async {
            let a = env.site("a").await;
            let b = env.site("b").await;
            let (a_mail, b_mail) = (sae("A-mail"), sae("B-mail"));
            feed(&[&a, &b], 0..20).await;
            confirm(&a, &b).await;
            let avail = a.counts(LINK).await.unwrap().available_bits_owned;
            assert!(avail > 2048 && avail <= u64::from(kmd_keypool::MAX_KEY_BITS), "{avail} bits owned");
            let request = |count, size_bits| ReserveRequest {
                master: a_mail.clone(),
                slaves: vec![b_mail.clone()],
                count,
                size_bits,
            };
            let batch = vec![request(2, 256), request(1, avail as u32), request(1, 7), request(3, 512)];
            let mut out = a.reserve_key_batch(LINK, batch).await.unwrap().into_iter();

            let first = out.next().unwrap().unwrap();
            assert!(first.len() == 2 && first.iter().all(|g| g.key.len() == 32));
            match out.next().unwrap() {
                Err(PoolError::Exhausted { requested_bits, available_bits }) => {
                    assert_eq!((requested_bits, available_bits), (avail, avail - 512))
                }
                other => panic!("the request for everything after the first: {other:?}"),
            }
            assert!(matches!(out.next().unwrap(), Err(PoolError::InvalidKeySize { size_bits: 7, .. })));
            let last = out.next().unwrap().unwrap();
            assert!(last.len() == 3 && last.iter().all(|g| g.key.len() == 64));
            assert!(out.next().is_none());
            assert_eq!(a.counts(LINK).await.unwrap().available_bits_owned, avail - 2 * 256 - 3 * 512);

            let grants: Vec<_> = first.iter().chain(&last).collect();
            assert_disjoint(grants.iter().map(|g| &g.assignment));
            let outcome = b
                .accept_peer_assignment(LINK, grants.iter().map(|g| g.assignment.clone()).collect())
                .await
                .unwrap();
            assert_eq!(outcome.accepted, 5);
            let ids: Vec<String> = grants.iter().map(|g| g.key_id().to_owned()).collect();
            a.mark_delivered_for_encryption(&a_mail, ids.clone()).await.unwrap();
            let fetched = b.take_for_decryption(&b_mail, &a_mail, ids).await.unwrap();
            for (g, f) in grants.iter().zip(&fetched) {
                assert_eq!((g.key_id(), &g.key[..]), (f.key_id.as_str(), &f.key[..]));
            }
            assert_integrity(&a).await;
            assert_integrity(&b).await;
        });
    });
}

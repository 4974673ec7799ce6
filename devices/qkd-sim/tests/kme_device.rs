//! The KME device driver (`qkd_device::kme`) at both ends of the simulated KME pair: the master
//! at KME A obtains keys, the slave at KME B fetches them by ID, and both hand up the same blocks.

mod kme_support;

use std::time::Duration;

use kme_support::{Fixture, KME_A, KME_B, Limits, SAE_A, SAE_B};
use qkd_device::kme::{KmeDevice, KmeDeviceConfig, KmeRole, key_id_kcv};
use qkd_device::{BlockId, DeviceError, DeviceEvent, DeviceKeyBlock, LinkState, QkdDevice};

fn device(fx: &Fixture, role: KmeRole) -> KmeDevice {
    let (url, stem, sae, peer) = match role {
        KmeRole::Master => (fx.url_a(), "sae-a", SAE_A, SAE_B),
        KmeRole::Slave => (fx.url_b(), "sae-b", SAE_B, SAE_A),
    };
    let mut cfg = KmeDeviceConfig::new(
        url,
        fx.path("ca.pem"),
        fx.path(&format!("{stem}.pem")),
        fx.path(&format!("{stem}.key")),
        sae,
        peer,
        role,
    );
    cfg.poll_interval_ms = 100;
    cfg.keys_per_request = 3;
    KmeDevice::open(cfg).expect("device opens")
}

/// The next event, within 10 s.
async fn next(device: &mut KmeDevice) -> Result<DeviceEvent, DeviceError> {
    tokio::time::timeout(Duration::from_secs(10), device.next_event()).await.expect("an event within 10 s")
}

/// Reads events until `f` returns `Some`, for at most 30 s (telemetry keeps coming meanwhile).
async fn wait_for<T>(
    device: &mut KmeDevice,
    mut f: impl FnMut(Result<DeviceEvent, DeviceError>) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, device.next_event())
            .await
            .expect("the awaited event within 30 s");
        if let Some(out) = f(event) {
            return out;
        }
    }
}

/// The next `n` key blocks, skipping telemetry; any other event fails the test.
async fn blocks(device: &mut KmeDevice, n: usize) -> Vec<DeviceKeyBlock> {
    let mut out = Vec::new();
    while out.len() < n {
        let block = wait_for(device, |event| match event {
            Ok(DeviceEvent::KeyBlock(block)) => Some(block),
            Ok(DeviceEvent::Telemetry(_) | DeviceEvent::Connected(_)) => None,
            other => panic!("unexpected event {other:?}"),
        })
        .await;
        out.push(block);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_and_slave_hand_up_identical_blocks() {
    let mut fx = Fixture::start(Limits::default()).await;
    let stream = fx.feed_random(10, 48).await; // 15 keys of 256 bits
    let mut master = device(&fx, KmeRole::Master);
    let mut slave = device(&fx, KmeRole::Slave);

    match next(&mut master).await {
        Ok(DeviceEvent::Connected(identity)) => {
            assert_eq!(identity.device_id, KME_A);
            assert_eq!(identity.link_id, format!("{KME_A}<->{KME_B}"));
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    match next(&mut master).await {
        Ok(DeviceEvent::Telemetry(t)) => {
            assert_eq!(t.link_state, LinkState::Up);
            assert_eq!(t.buffered_blocks, Some(15));
        }
        other => panic!("expected Telemetry, got {other:?}"),
    }
    match next(&mut slave).await {
        Ok(DeviceEvent::Connected(identity)) => {
            assert_eq!(identity.device_id, KME_B);
            assert_eq!(identity.link_id, format!("{KME_A}<->{KME_B}"), "the same link ID at both ends");
        }
        other => panic!("expected Connected, got {other:?}"),
    }

    master.request_blocks(7).await.expect("request");
    let sent = blocks(&mut master, 7).await; // three enc_keys calls of at most 3
    for (i, block) in sent.iter().enumerate() {
        assert_eq!(
            &block.key[..],
            &stream[i * 32..(i + 1) * 32],
            "keys come from the link's stream, in order"
        );
        let BlockId::KeyId(id) = &block.block_id else { panic!("not a key ID: {:?}", block.block_id) };
        assert_eq!(Some(block.kcv), key_id_kcv(id, &block.key));
        assert_eq!(block.created_unix_ms, 0);
    }

    slave.fetch_blocks(sent.iter().map(|b| b.block_id.clone()).collect()).await.expect("fetch");
    let received = blocks(&mut slave, 7).await;
    for (s, r) in sent.iter().zip(&received) {
        assert_eq!(s.block_id, r.block_id);
        assert_eq!(s.kcv, r.kcv);
        assert_eq!(s.key, r.key);
    }
    assert_eq!(fx.pair.pending_keys(), 0, "every key was fetched exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_waits_for_key_and_the_slave_reports_unknown_ids() {
    let mut fx = Fixture::start(Limits::default()).await;
    let mut master = device(&fx, KmeRole::Master);
    let mut slave = device(&fx, KmeRole::Slave);
    master.request_blocks(2).await.expect("request");

    // The pool is empty: telemetry, no block, no error.
    let wait = tokio::time::timeout(Duration::from_millis(400), async {
        loop {
            match master.next_event().await {
                Ok(DeviceEvent::Connected(_) | DeviceEvent::Telemetry(_)) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    });
    assert!(wait.await.is_err(), "no block while the KME has no key");

    fx.feed_random(1, 64).await;
    let sent = blocks(&mut master, 2).await;

    // One good ID and one unknown: the good key is delivered, the unknown one reported.
    let unknown = BlockId::KeyId("0a782fb5-3434-48fe-aa4d-14f41d46cf92".into());
    slave.fetch_blocks(vec![sent[0].block_id.clone(), unknown]).await.expect("fetch");
    let mut got_block = false;
    let mut got_error = false;
    while !(got_block && got_error) {
        match next(&mut slave).await {
            Ok(DeviceEvent::KeyBlock(block)) => {
                assert_eq!(block.block_id, sent[0].block_id);
                assert_eq!(block.key, sent[0].key);
                got_block = true;
            }
            Err(DeviceError::Kme { reason, .. }) => {
                assert!(reason.contains("0a782fb5-3434-48fe-aa4d-14f41d46cf92"), "{reason}");
                assert!(reason.contains("not found on KME"), "{reason}");
                got_error = true;
            }
            Ok(DeviceEvent::Connected(_) | DeviceEvent::Telemetry(_)) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }

    // Roles are enforced.
    assert!(matches!(master.fetch_blocks(vec![sent[1].block_id.clone()]).await, Err(DeviceError::Config(_))));
    assert!(slave.fetch_blocks(vec![BlockId::Sequence(3)]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kme_that_goes_away_is_reported_and_found_again() {
    let fx = Fixture::start(Limits::default()).await;
    let mut master = device(&fx, KmeRole::Master);
    assert!(matches!(next(&mut master).await, Ok(DeviceEvent::Connected(_))));
    master.request_blocks(1).await.expect("request"); // outstanding while the KME is away
    let stopped = fx.stop().await;
    let reason = wait_for(&mut master, |event| match event {
        Ok(DeviceEvent::Telemetry(_)) => None,
        Ok(DeviceEvent::Disconnected { reason }) => Some(reason),
        other => panic!("expected Disconnected, got {other:?}"),
    })
    .await;
    assert!(reason.contains("127.0.0.1"), "the reason names the KME: {reason}");

    // The driver retries with back-off, finds the KME again and still owes the block.
    let mut fx = stopped.start().await;
    let identity = wait_for(&mut master, |event| match event {
        Ok(DeviceEvent::Telemetry(_)) => None,
        Ok(DeviceEvent::Connected(identity)) => Some(identity),
        other => panic!("expected Connected, got {other:?}"),
    })
    .await;
    assert_eq!(identity.device_id, KME_A);
    fx.send(vec![vec![7; 32]]).await; // the driver takes it as soon as it arrives
    let block = blocks(&mut master, 1).await;
    assert_eq!(&block[0].key[..], &[7; 32]);
}

//! Cron ticks across a real partition: three hosts in namespaces, each
//! with a nats-server beside it (the tick leases, three replicas), cut
//! into two sides by nftables and healed. The probe fixture relays each
//! tick to a recorder on the test's own address, which no fault drops.

use std::time::Duration;

use super::net::Net;
use super::{deploy_with, print_logs, until_all_see_each_other};
use crate::cluster::cron::{recorder_on, relaying, settle, tick_time, ticks};
use crate::common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_a_partition_runs_no_cron_tick_twice() {
    let mut net = Net::new(3);
    net.start_nats().await;
    net.start_all().await;
    let urls: Vec<String> = net.hosts.iter().map(|h| h.url.clone()).collect();
    until_all_see_each_other(&urls).await;
    let (recorder, seen) = recorder_on(&net.client_ip()).await;
    let policy = relaying("* * * * * *", recorder).into_bytes();
    deploy_with(&urls, "probe", policy, "/count").await;
    common::eventually("a first tick relayed", || async {
        !ticks(&seen).is_empty()
    })
    .await;

    let started = jiff::Timestamp::now().as_second();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // h3 alone, with the NATS server beside it: a minority, which takes
    // no lease.
    net.partition(&[&[0, 1], &[2]]);
    let parted = jiff::Timestamp::now().as_second();
    tokio::time::sleep(Duration::from_secs(CUT_S as u64)).await;
    net.heal();
    let healed = jiff::Timestamp::now().as_second();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let ended = jiff::Timestamp::now().as_second();

    // Every tick before the partition ran, and every tick once the
    // cluster (and NATS, which may elect new leaders and catch h3's server
    // up on 40 s of writes, and the hosts' NATS clients, which may
    // reconnect) had twenty seconds after the heal. During the cut a tick may be lost: claimed by h3
    // and accepted before the cut, its lease then out of reach; or while
    // a host's NATS client reconnects or NATS moves a leader to the
    // majority side (the lease is then out of reach on that side too).
    let expected: Vec<i64> = (started + 1..parted - 1)
        .chain(healed + 20..ended)
        .collect();
    let (twice, missing) = settle(&seen, &expected, Duration::from_secs(20)).await;
    if !twice.is_empty() || !missing.is_empty() {
        print_logs(&net);
    }
    let counts = ticks(&seen);
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    assert!(
        missing.is_empty(),
        "ticks nobody ran: {missing:?} (partitioned {parted}..{healed}) of {counts:?}"
    );
    // The side that reaches NATS (h1 and h2, two of its three servers)
    // runs the ticks during the cut, once its NATS clients (some connected
    // to h3's server, noticed gone by their 2 s pings) and the lease
    // stream's leader have moved to its side: within MOVED_S of the cut.
    let during = counts
        .keys()
        .map(|id| tick_time(id).as_second())
        .filter(|t| (parted + MOVED_S..healed).contains(t))
        .count();
    if during == 0 {
        print_logs(&net);
    }
    assert!(
        during > 0,
        "no tick ran in the last {}s of the {}s partition on the side that reaches NATS: {counts:?}",
        healed - parted - MOVED_S,
        healed - parted
    );
}

/// How long the partition lasts, in seconds.
const CUT_S: i64 = 40;
/// How long the majority side may take to reach NATS again after the cut
/// (its clients moved, a lease leader elected), in seconds.
const MOVED_S: i64 = 20;

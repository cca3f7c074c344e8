//! Kernel memory: the programs' maps of classes that do not run are created
//! with one entry, and those of the classes that run at their documented
//! sizes (the socket map at `--max-sockets`).

use kdiag_tests::{
    agent::Agent,
    bpf::{MapInfo, maps_held_by},
    env::require_root,
};

/// Maps of the TCP, memory and drop classes, sized only when their class
/// runs.
const CLASS_MAPS: &[&str] = &[
    "DROP_COUNTS",
    "SOCKS",
    "LISTENERS",
    "SYNACK_RETRANS",
    "STALL_STARTS",
    "TRY_ORDER",
    "RECLAIM_STATS",
    "COMPACT_STATS",
];

fn map<'a>(maps: &'a [MapInfo], name: &str) -> &'a MapInfo {
    maps.iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("the agent holds no {name} map: {maps:#?}"))
}

#[test]
fn maps_of_classes_that_do_not_run_are_one_entry() {
    require_root();
    let (mut agent, _) = Agent::start(&["softirq"], &["irq/softirq_entry"]);
    let maps = maps_held_by(agent.pid());
    agent.stop_ok();
    for name in CLASS_MAPS {
        assert_eq!(
            map(&maps, name).max_entries,
            1,
            "{name} in `softirq`: {maps:#?}"
        );
    }
    // Everything but the 4 MiB ring: the softirq histograms and small
    // bookkeeping, under a mebibyte in all.
    let others: u64 = maps
        .iter()
        .filter(|m| m.name != "EVENTS")
        .map(|m| m.bytes_memlock)
        .sum();
    assert!(
        others < 1 << 20,
        "`softirq` holds {others} bytes of maps besides the ring: {maps:#?}"
    );
}

#[test]
fn running_classes_size_their_maps() {
    require_root();
    let (mut agent, _) = Agent::start(
        &["tcp", "--max-sockets", "4096"],
        &["sock/inet_sock_set_state"],
    );
    let tcp = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_eq!(map(&tcp, "SOCKS").max_entries, 4096, "{tcp:#?}");
    assert_eq!(map(&tcp, "LISTENERS").max_entries, 8192, "{tcp:#?}");
    assert_eq!(map(&tcp, "STALL_STARTS").max_entries, 1, "{tcp:#?}");

    // The per-reason drop counters, and the socket map for TCP owners.
    let (mut agent, _) = Agent::start(&["drop"], &["skb/kfree_skb"]);
    let drop = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_eq!(map(&drop, "DROP_COUNTS").max_entries, 1024, "{drop:#?}");
    assert_eq!(map(&drop, "SOCKS").max_entries, 65536, "{drop:#?}");

    let (mut agent, _) = Agent::start(&["compact"], &["compaction/mm_compaction_begin"]);
    let compact = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_eq!(
        map(&compact, "STALL_STARTS").max_entries,
        10240,
        "{compact:#?}"
    );
    assert_eq!(
        map(&compact, "COMPACT_STATS").max_entries,
        16384,
        "{compact:#?}"
    );
    assert_eq!(
        map(&compact, "RECLAIM_STATS").max_entries,
        1,
        "{compact:#?}"
    );
    assert_eq!(map(&compact, "SOCKS").max_entries, 1, "{compact:#?}");
}

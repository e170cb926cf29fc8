//! A small network of "nodes" on this machine: one network namespace per node, node 0's holding
//! a bridge (the switch), each other node joined to it by a veth pair, addresses
//! `192.168.<subnet>.<node + 1>/24`. Links can be cut (`ip link set down`), restored, delayed or
//! made lossy. Everything is removed when the [`Net`] is dropped, also when a test panics.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::nfqueue::Delayer;

/// Deadline of one `ip`, `tc` or `iptables` call.
const TOOL_TIMEOUT_SECS: &str = "20";

/// The queue number of the delay stand-in (queues are per namespace).
const DELAY_QUEUE: u16 = 0;

/// Runs a tool under a deadline; the error holds its output.
pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg(TOOL_TIMEOUT_SECS)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Whether this process may create network namespaces (tries one, once, and removes it).
pub fn can_make_namespaces() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return false;
        }
        let name = format!("burnrun-netem-probe-{}", std::process::id());
        let made = run(&["ip", "netns", "add", &name]).is_ok();
        if made {
            let _ = run(&["ip", "netns", "del", &name]);
        }
        made
    })
}

/// Whether iptables runs here (`.ci/run` installs it).
fn has_iptables() -> bool {
    run(&["iptables", "-V"]).is_ok()
}

/// How an impairment was made: netem where the kernel has it, else the netfilter stand-ins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `tc qdisc ... netem` on both ends of the link.
    Netem,
    /// iptables in the node's namespace, both directions: `-m statistic` drops, or NFQUEUE to a
    /// [`Delayer`].
    Netfilter,
}

/// The nodes' namespaces and links.
pub struct Net {
    namespaces: Vec<String>,
    /// Node i's end of its link (in its namespace); node 0's entry is the bridge.
    node_ends: Vec<String>,
    /// The switch's end of node i's link (in node 0's namespace); unused for node 0.
    switch_ends: Vec<String>,
    subnet: u8,
    delayers: Vec<Delayer>,
}

impl Net {
    /// Creates `nodes` namespaces joined by the bridge; `subnet` (unique per test) names them
    /// and their addresses, with this process's id, so tests and test runs never collide.
    pub fn new(subnet: u8, nodes: usize) -> Result<Self, String> {
        let pid = std::process::id();
        let net = Net {
            namespaces: (0..nodes)
                .map(|i| format!("burnrun-netem-{pid}-{subnet}-n{i}"))
                .collect(),
            // Interface names: at most 15 bytes.
            node_ends: (0..nodes).map(|i| format!("e{pid}x{subnet}n{i}")).collect(),
            switch_ends: (0..nodes).map(|i| format!("p{pid}x{subnet}n{i}")).collect(),
            subnet,
            delayers: Vec::new(),
        };
        // From here on, the drop removes whatever was made.
        for ns in &net.namespaces {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let (ns0, bridge) = (&net.namespaces[0], &net.node_ends[0]);
        run(&["ip", "-n", ns0, "link", "add", bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            ns0,
            "addr",
            "add",
            &format!("{}/24", net.addr(0)),
            "dev",
            bridge,
        ])?;
        run(&["ip", "-n", ns0, "link", "set", bridge, "up"])?;
        for i in 1..nodes {
            let (ns, node_end, switch_end) = (&net.namespaces[i], &net.node_ends[i], &net.switch_ends[i]);
            run(&[
                "ip", "link", "add", switch_end, "netns", ns0, "type", "veth", "peer", "name", node_end, "netns", ns,
            ])?;
            run(&["ip", "-n", ns0, "link", "set", switch_end, "master", bridge])?;
            run(&["ip", "-n", ns0, "link", "set", switch_end, "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                node_end,
            ])?;
            run(&["ip", "-n", ns, "link", "set", node_end, "up"])?;
        }
        Ok(net)
    }

    /// Node `node`'s address.
    pub fn addr(&self, node: usize) -> String {
        format!("192.168.{}.{}", self.subnet, node + 1)
    }

    /// The command prefix that runs a program in node `node`'s namespace.
    pub fn exec(&self, node: usize) -> [&str; 4] {
        ["ip", "netns", "exec", &self.namespaces[node]]
    }

    /// Cuts (`up = false`) or restores node `node`'s link (node > 0), from its side, as when a
    /// host's cable is pulled: the switch's end loses its carrier too.
    pub fn set_link(&self, node: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        run(&[
            "ip",
            "-n",
            &self.namespaces[node],
            "link",
            "set",
            &self.node_ends[node],
            state,
        ])
    }

    /// Delays every packet on node `node`'s link (node > 0) by `delay`, each way. `None` when
    /// this machine can do neither netem nor its stand-in (no iptables).
    pub fn delay(&mut self, node: usize, delay: Duration) -> Result<Option<Method>, String> {
        let ms = format!("{}ms", delay.as_millis());
        if self.netem(node, &["delay", &ms])? {
            return Ok(Some(Method::Netem));
        }
        if !has_iptables() {
            return Ok(None);
        }
        let ns = self.namespaces[node].clone();
        let delayer = Delayer::start(&ns, DELAY_QUEUE, delay)
            .map_err(|e| format!("no sch_netem, and NFQUEUE in {ns} failed: {e}"))?;
        self.delayers.push(delayer);
        let queue = DELAY_QUEUE.to_string();
        self.iptables_both_ways(node, &["-j", "NFQUEUE", "--queue-num", &queue, "--queue-bypass"])?;
        Ok(Some(Method::Netfilter))
    }

    /// Drops `percent` of the packets on node `node`'s link (node > 0), each way, at random.
    /// `None` as for [`Net::delay`].
    pub fn loss(&self, node: usize, percent: f64) -> Result<Option<Method>, String> {
        if self.netem(node, &["loss", &format!("{percent}%")])? {
            return Ok(Some(Method::Netem));
        }
        if !has_iptables() {
            return Ok(None);
        }
        let probability = format!("{}", percent / 100.0);
        self.iptables_both_ways(
            node,
            &[
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ],
        )?;
        Ok(Some(Method::Netfilter))
    }

    /// Limits node `node`'s link (node > 0) to `rate` (tc's units, e.g. `200mbit`) each way with
    /// a token bucket (`tbf`, in every kernel with traffic control). Call it before [`Net::loss`]:
    /// where the kernel has netem, the loss goes under the rate as its child qdisc.
    pub fn rate(&self, node: usize, rate: &str) -> Result<(), String> {
        let ends = [
            (&self.namespaces[node], &self.node_ends[node]),
            (&self.namespaces[0], &self.switch_ends[node]),
        ];
        for (ns, dev) in ends {
            // A bucket of 128 KiB lets a 64 KiB GSO packet through whole; 50 ms of queue.
            run(&[
                "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", rate, "burst",
                "131072", "latency", "50ms",
            ])?;
        }
        Ok(())
    }

    /// Packets [`Net::loss`] dropped on node `node`'s link so far, as netem's qdiscs on both
    /// ends or the iptables rules count them (`None` when neither shows a count).
    pub fn dropped_packets(&self, node: usize) -> Option<u64> {
        let output = |args: &[&str]| {
            Command::new("timeout")
                .arg(TOOL_TIMEOUT_SECS)
                .args(args)
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default()
        };
        let (ns, ns0) = (&self.namespaces[node], &self.namespaces[0]);
        // netem: " Sent 1234 bytes 56 pkt (dropped 3, overlimits 0 requeues 0)" per qdisc.
        let netem = [
            output(&["tc", "-s", "-n", ns, "qdisc", "show", "dev", &self.node_ends[node]]),
            output(&["tc", "-s", "-n", ns0, "qdisc", "show", "dev", &self.switch_ends[node]]),
        ];
        let mut counts: Vec<u64> = netem
            .iter()
            .filter(|text| text.contains("netem"))
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.split_once("(dropped ")?.1.split(',').next()?.parse().ok())
            })
            .collect();
        // iptables: the packet count leads each rule's line.
        let rules = output(&[
            "ip", "netns", "exec", ns, "iptables", "-w", "10", "-L", "-v", "-x", "-n",
        ]);
        counts.extend(
            rules
                .lines()
                .filter(|l| l.contains("DROP") && l.contains("statistic"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()),
        );
        (!counts.is_empty()).then(|| counts.iter().sum())
    }

    /// `tc netem ARGS` on both ends of node `node`'s link; false when the kernel has no netem
    /// (this machine's and CI's), any other failure is an error.
    fn netem(&self, node: usize, args: &[&str]) -> Result<bool, String> {
        let ends = [
            (&self.namespaces[node], &self.node_ends[node]),
            (&self.namespaces[0], &self.switch_ends[node]),
        ];
        for (ns, dev) in ends {
            // Under a rate's token bucket (see `Net::rate`) if there is one, else at the root.
            let shaped = Command::new("tc")
                .args(["-n", ns, "qdisc", "show", "dev", dev])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("tbf 1:"));
            let parent: &[&str] = if shaped { &["parent", "1:1"] } else { &["root"] };
            let mut command = vec!["tc", "-n", ns, "qdisc", "add", "dev", dev];
            command.extend_from_slice(parent);
            command.push("netem");
            command.extend_from_slice(args);
            match run(&command) {
                Ok(()) => {}
                Err(e) if e.contains("qdisc kind is unknown") => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// An iptables rule for the packets node `node` sends on its link and one for those it
    /// receives, in its namespace.
    fn iptables_both_ways(&self, node: usize, target: &[&str]) -> Result<(), String> {
        let (ns, dev) = (&self.namespaces[node], &self.node_ends[node]);
        for (chain, direction) in [("OUTPUT", "-o"), ("INPUT", "-i")] {
            let mut command = vec![
                "ip", "netns", "exec", ns, "iptables", "-w", "10", "-A", chain, direction, dev,
            ];
            command.extend_from_slice(target);
            run(&command)?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The delayers first: their threads live in the namespaces.
        self.delayers.clear();
        for ns in &self.namespaces {
            // Deleting a namespace removes its interfaces, and a veth goes with either end.
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

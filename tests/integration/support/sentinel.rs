//! A Redis Sentinel for the tests: `redis-server sentinel.conf --sentinel` on a free port,
//! monitoring given primaries, stopped by PID on drop.

use super::{free_port, launch_retrying, ping, wait_until, Launch, TempDir};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A Redis Sentinel (`redis-server <conf> --sentinel`) on a free port, monitoring
/// `masters` (name, primary's port) with a quorum of 2, killed by PID on drop.
pub struct Sentinel {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    masters: Vec<(String, u16)>,
}

impl Sentinel {
    pub fn start(masters: &[(&str, u16)]) -> Sentinel {
        let mut s = Sentinel {
            port: free_port(),
            child: None,
            dir: TempDir::new("sentinel"),
            masters: masters.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        launch_retrying(self, "redis sentinel");
    }

    /// Writes `sentinel.conf` for its port and masters.
    fn write_conf(&self) {
        let mut conf = format!(
            "port {}\nbind 127.0.0.1\ndir {}\nlogfile {}\nsentinel resolve-hostnames no\n",
            self.port,
            self.dir.path().display(),
            self.dir.path().join("sentinel.log").display()
        );
        for (name, port) in &self.masters {
            conf.push_str(&format!(
                "sentinel monitor {name} 127.0.0.1 {port} 2\n\
                 sentinel down-after-milliseconds {name} 2000\n\
                 sentinel failover-timeout {name} 5000\n"
            ));
        }
        std::fs::write(self.dir.path().join("sentinel.conf"), conf).unwrap();
    }

    /// What it logged (its events: `+sdown`, `+switch-master`, `+convert-to-slave`, …).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the sentinel (SIGKILL by PID).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with the configuration it rewrote meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.run(), "sentinel restarted");
    }

    /// Runs `redis-server sentinel.conf --sentinel` from its directory; true once it answers
    /// PING (within 5 s).
    fn run(&mut self) -> bool {
        let child = Command::new("redis-server")
            .arg(self.dir.path().join("sentinel.conf"))
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/ensure-deps.sh)");
        self.child = Some(child);
        wait_until(Duration::from_secs(5), || ping(self.port))
    }

    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap();
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// The port of `master`'s primary, as this sentinel says.
    pub fn master_port(&self, master: &str) -> Option<u16> {
        match self.cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", master]) {
            Ok(redis::Value::Array(v)) if v.len() == 2 => match &v[1] {
                redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }
}

impl Launch for Sentinel {
    /// A new `sentinel.conf` for the current port, then [`Sentinel::run`].
    fn launch(&mut self) -> bool {
        self.write_conf();
        self.run()
    }

    fn stop(&mut self) {
        Sentinel::stop(self);
    }

    fn port_mut(&mut self) -> &mut u16 {
        &mut self.port
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.stop();
    }
}

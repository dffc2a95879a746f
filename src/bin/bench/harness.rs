//! What every benchmark shares: the sidecar process it measures, /proc memory readings,
//! percentiles, and printing results as a table and writing them as JSON.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The sidecar binary built next to this one.
fn sidecar_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me.with_file_name("export-sidecar");
    path.exists().then_some(path).ok_or_else(|| "build export-sidecar first (cargo build --release)".into())
}

pub fn free_port() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.local_addr().map_err(|e| e.to_string())
}

/// A sidecar process for a benchmark; killed on drop.
pub struct SidecarProcess {
    child: Child,
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SidecarProcess {
    /// Starts `export-sidecar run` against `upstream` with its journal at `journal` and waits
    /// until it accepts connections.
    pub async fn start(upstream: &str, journal: &Path, extra: &[String]) -> Result<SidecarProcess, String> {
        let (public, internal) = (free_port()?, free_port()?);
        let child = Command::new(sidecar_binary()?)
            .args(["run", "--upstream", upstream, "--listen", &public.to_string()])
            .args(["--internal-listen", &internal.to_string()])
            .arg("--journal")
            .arg(journal)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the sidecar: {e}"))?;
        let process = SidecarProcess { child, public, internal };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(public).await.is_err() {
            if Instant::now() > deadline {
                return Err("the sidecar did not start listening".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(process)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// Resident set size in KiB now.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// The highest resident set size in KiB so far.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    /// CPU time (user and system, all threads) so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        process_tree_cpu_seconds(self.child.id())
    }
}

/// CPU time of a process and its direct children (nginx's workers), from /proc.
pub fn process_tree_cpu_seconds(pid: u32) -> Option<f64> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let others = children.split_whitespace().filter_map(|c| c.parse().ok());
    std::iter::once(pid).chain(others).map(process_cpu_seconds).sum()
}

/// utime + stime of one process (fields 14 and 15 of /proc/PID/stat, after the command name,
/// which may hold spaces), in clock ticks of USER_HZ, which is 100 in Linux's ABI.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The value at fraction `p` of already sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

/// The middle of a few repeated measurements: one disturbed run does not decide the figure.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    percentile(&samples, 0.5)
}

/// A table to print: a header row and rows of cells, right-aligned but for the first column.
pub struct Table {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn print(&self, title: &str) {
        let columns = self.header.len();
        let width = |c: usize| {
            let cells = self.rows.iter().filter_map(|r| r.get(c)).map(String::len);
            cells.chain([self.header[c].len()]).max().unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        println!("\n{title}");
        let line = |cells: Vec<&str>| {
            let shown: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect();
            println!("  {}", shown.join("  "));
        };
        line(self.header.clone());
        for row in &self.rows {
            line(row.iter().map(String::as_str).collect());
        }
    }
}

/// A figure for a table cell: a dash for what was not measured.
pub fn cell(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

pub fn write_json(path: &Path, results: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(results).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("\n(written to {})", path.display());
    Ok(())
}

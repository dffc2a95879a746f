//! The command line as operators use it: start-up refusals that name the setting, and the
//! demo that the README's first command runs.

mod common;

use common::free_port;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sidecar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_export-sidecar"))
}

/// Runs `export-sidecar run` expecting it to refuse to start; returns its error output.
fn refused(upstream: &str, public: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = sidecar()
        .args(["run", "--upstream", upstream])
        .args(["--listen", public, "--internal-listen", &free_port().to_string()])
        .arg("--journal")
        .arg(dir.path().join("journal.sqlite"))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!output.status.success(), "start-up should have been refused");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_busy_listen_address_stops_start_up() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let message = refused("http://127.0.0.1:9", &addr, &[]);
    assert!(message.contains("listen.public") && message.contains(&addr), "{message}");
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[upstream]\nconcurency = 4\n", "concurency"),
        ("[upstream]\nconcurrency = 0\n", "upstream.concurrency"),
        ("[listen]\npublic = \"not an address\"\n", "public"),
        ("[log]\nformat = \"xml\"\n", "format"),
        ("[changes]\nwebhook_secret = \"whsec_%%%\"\n", "changes.webhook_secret"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).expect("write config");
        let public = free_port().to_string();
        let message = refused("http://127.0.0.1:9", &public, &["--config", path.to_str().expect("utf-8")]);
        assert!(message.contains(key), "{text:?} should name {key}: {message}");
    }
    let message = refused("https://example.invalid", &free_port().to_string(), &[]);
    assert!(message.contains("upstream.url"), "{message}");
}

#[tokio::test]
async fn sigterm_exits_once_nothing_is_in_flight() {
    let reference = export_sidecar::reference::ReferenceServer::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        Default::default(),
    )
    .await
    .expect("reference starts");
    let mut sidecar = common::Sidecar::start(&reference.url()).await;
    let started = Instant::now();
    let status =
        Command::new("kill").args(["-TERM", &sidecar.pid().to_string()]).status().expect("kill runs");
    assert!(status.success());
    // The grace period is 30 s; an idle sidecar must not sleep it out.
    let exit = sidecar.wait_exit(Duration::from_secs(20)).await.expect("exited after SIGTERM");
    assert!(exit.success(), "a SIGTERM shutdown exits 0: {exit:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A demo process, stopped when dropped: a failing assertion must not leave it running. It is
/// asked with SIGTERM first, so it removes its journal directory as a user's Ctrl-C would.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_demo(public: std::net::SocketAddr, internal: std::net::SocketAddr) -> Demo {
    let child = sidecar()
        .args(["demo", "--listen", &public.to_string(), "--internal-listen", &internal.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    Demo(child)
}

/// Waits until the demo on `public` serves `demo:animals`; returns the body.
async fn demo_animals(client: &reqwest::Client, public: std::net::SocketAddr) -> String {
    let url = format!("http://{public}/export/datasets/demo:animals?encoding=json-lines");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the demo did not serve its collection in 30 s");
        if let Ok(response) = client.get(&url).send().await {
            if response.status() == 200 {
                return response.text().await.expect("body");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_demo_serves_its_sample_collections() {
    let journals_before = demo_journals();
    let (public, internal) = (free_port(), free_port());
    let demo = start_demo(public, internal);
    let client = common::client();
    let body = demo_animals(&client, public).await;
    assert!(body.lines().count() > 400, "demo:animals holds hundreds of records");
    let private = format!("http://{public}/export/datasets/private:diary?encoding=json");
    assert_eq!(client.get(&private).send().await.expect("sent").status(), 401);
    let with_token = client.get(&private).bearer_auth("demo-token").send().await.expect("sent");
    assert_eq!(with_token.status(), 200);

    // A second demo, on other ports or failing on these, leaves the first one's journal alone.
    let (other_public, other_internal) = (free_port(), free_port());
    let other = start_demo(other_public, other_internal);
    demo_animals(&client, other_public).await;
    let mut clash = start_demo(public, internal);
    let clash_exit = clash.0.wait().expect("the clashing demo exits");
    assert!(!clash_exit.success(), "a demo on busy ports fails");
    let mut printed = String::new();
    let stdout = clash.0.stdout.take().expect("stdout piped");
    std::io::Read::read_to_string(&mut { stdout }, &mut printed).expect("stdout readable");
    assert!(!printed.contains("Try:"), "a demo that cannot listen prints no commands to try:\n{printed}");
    let ready = client.get(format!("http://{internal}/readyz")).send().await.expect("sent");
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap_or_default());

    // Stopped with SIGTERM (which exits without running destructors), the demos still remove
    // their journal directories.
    drop((demo, other));
    let left: Vec<_> = demo_journals().difference(&journals_before).cloned().collect();
    assert!(left.is_empty(), "demo journal directories left behind: {left:?}");
}

fn demo_journals() -> std::collections::BTreeSet<std::path::PathBuf> {
    let entries = std::fs::read_dir(std::env::temp_dir()).expect("temp dir readable");
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("export-sidecar-demo-")))
        .collect()
}

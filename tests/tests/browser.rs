//! The status page in a real headless browser (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver): two paired daemons; without the login cookie A's page is only the
//! login form; logged in through `tandem open`, it shows B as a member in sync, and a write on
//! B appears in its recent changes without a reload. A screenshot is kept in the test's
//! target dir. Without chromedriver the test says so and skips (`.ci/run` installs it).

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::Daemon;

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {n}")])
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| n.to_string())
    })
}

impl Driver {
    fn start() -> Option<Driver> {
        let bin = find(&["chromedriver", "/usr/lib/chromium/chromedriver"])?;
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while ureq::get(&format!("{}/status", d.base)).call().is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(d)
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let resp = match method {
            "GET" => ureq::get(&url).call(),
            "DELETE" => ureq::delete(&url).call(),
            _ => ureq::post(&url).send_json(body),
        };
        match resp {
            Ok(r) => r.into_json::<Value>().unwrap()["value"].clone(),
            Err(ureq::Error::Status(s, r)) => {
                panic!("webdriver {path}: {s} {}", r.into_string().unwrap())
            }
            Err(e) => panic!("webdriver {path}: {e}"),
        }
    }
}

/// A browser session.
struct Browser<'a> {
    driver: &'a Driver,
    id: String,
}

impl Browser<'_> {
    fn open(driver: &Driver) -> Browser<'_> {
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ];
        if std::env::var_os("CI").is_some() {
            args.push("--disable-extensions");
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": args},
        }}});
        let v = driver.call("POST", "/session", caps);
        Browser {
            driver,
            id: v["sessionId"].as_str().unwrap().to_string(),
        }
    }

    fn go(&self, url: &str) {
        self.driver.call(
            "POST",
            &format!("/session/{}/url", self.id),
            json!({"url": url}),
        );
    }

    fn run(&self, script: &str) -> Value {
        self.driver.call(
            "POST",
            &format!("/session/{}/execute/sync", self.id),
            json!({"script": script, "args": []}),
        )
    }

    /// The text of the element with `id` ("" if there is none).
    fn text(&self, id: &str) -> String {
        self.run(&format!(
            "const e = document.getElementById({id:?}); return e ? e.innerText : '';"
        ))
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    fn wait_text(&self, id: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let t = self.text(id);
            if f(&t) {
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}; #{id} says {t:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self) -> Vec<u8> {
        let v = self.driver.call(
            "GET",
            &format!("/session/{}/screenshot", self.id),
            Value::Null,
        );
        base64_decode(v.as_str().unwrap())
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.driver.base, self.id)).call();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        let v = ABC.iter().position(|x| *x == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn the_status_page_in_a_real_browser() {
    let Some(driver) = Driver::start() else {
        eprintln!(
            "skipping: chromedriver not found (apt-get install chromium chromium-driver; .ci/run does)"
        );
        return;
    };
    let a = Daemon::start();
    let b = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    let (base, _) = a.api();
    let b_short = b.ok(&["id", "--short"]);
    let browser = Browser::open(&driver);

    // No cookie: the login form, and nothing about the node.
    browser.go(&format!("{base}/ui/"));
    let html = browser.run("return document.documentElement.outerHTML;");
    let html = html.as_str().unwrap();
    assert!(html.contains("id=\"login\""), "{html}");
    assert!(
        !html.contains(&a.ok(&["id", "--short"])),
        "the form leaks nothing"
    );

    // Logged in: B is a member, in sync.
    browser.go(&a.ok(&["open"]));
    let members = browser.wait_text("members", "B in sync on A's page", |t| {
        t.contains(&b_short) && t.contains("connected") && t.contains("yes")
    });
    assert!(members.contains(&b_short), "{members}");

    // A write on B shows up in A's recent changes, live.
    let doc = b.ok(&["doc", "new", r#"{"from":"b"}"#]);
    browser.wait_text("changes", "B's write in A's recent changes", |t| {
        t.contains(&doc[..8])
    });
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!("status page screenshot: {}", path.display());
}

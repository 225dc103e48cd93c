//! The whole platform as a user meets it: the real OpenID provider, the API and web page, the
//! operator, and the tenant's inference and outputs pods running the real binary with the tiny
//! model. Headless Chromium (Debian's package driven by npm `playwright-core`,
//! tests/browser/page.mjs) logs in, generates, watches the progress and finds the image in
//! "My images"; an admin opens the tenant's view. Screenshots are kept as test artifacts.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use atelier_crds::{GenerationJob, JobPhase};
use atelier_tests::{TestCluster, paths, unique_name};
use common::platform::{ApiProcess, free_port, start_provider};
use common::{Operator, create_tenant, wait_tenant_ready};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;

#[tokio::test]
async fn the_page_logs_in_generates_with_the_tiny_model_and_shows_the_image() {
    let browser_dir = paths::workspace_root().join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists() && browser_dir.join("node_modules/playwright-core").exists(),
        "needs Debian's chromium ({chromium}) and `npm ci` in {}",
        browser_dir.display()
    );
    let cluster = TestCluster::shared().await;
    common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml").unwrap();
    let _operator = Operator::start(cluster, &[]).unwrap();
    let tenant = create_tenant(
        cluster,
        json!({ "members": [
            { "group": "team-x", "role": "user" },
            { "group": "team-x-admins", "role": "admin" },
        ] }),
    )
    .await
    .unwrap();
    wait_tenant_ready(cluster, &tenant.name_any(), Duration::from_secs(120))
        .await
        .unwrap();

    let dir = tempfile::Builder::new()
        .prefix("atelier-platform-")
        .tempdir()
        .unwrap()
        .keep();
    let port = free_port();
    let provider = start_provider(&dir, &format!("http://127.0.0.1:{port}")).unwrap();
    let api = ApiProcess::start(cluster, &dir, port, &provider.issuer, &[])
        .await
        .unwrap();

    let prompt = format!("a fox seen by the browser {}", unique_name("p"));
    let screenshots = std::env::temp_dir().join("atelier-browser-screenshots");
    let page = tokio::process::Command::new("node")
        .arg(browser_dir.join("page.mjs"))
        .args(["--api", &api.url, "--prompt", &prompt])
        .args(["--login", "alice@example.com", "--password", "alice-pw"])
        .args(["--admin-login", "carol@example.com"])
        .args(["--admin-password", "carol-pw"])
        .arg("--out")
        .arg(&screenshots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(240), page.wait_with_output())
        .await
        .expect("the page script finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("PAGE OK"),
        "{stdout}{}\nscreenshots in {}",
        String::from_utf8_lossy(&output.stderr),
        screenshots.display()
    );
    eprintln!("screenshots of the page in {}", screenshots.display());

    // The page's job went through the real controller and inference pod.
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &tenant.namespace_name())
        .list(&ListParams::default())
        .await
        .unwrap();
    let job = jobs
        .items
        .iter()
        .find(|job| job.spec.prompt == prompt)
        .expect("the page's job");
    assert_eq!(job.phase(), JobPhase::Succeeded);
    assert_eq!(job.spec.user, "alice@example.com");
    let output = &job.status.as_ref().unwrap().outputs[0];
    let png = common::outputs_dir(cluster, &tenant.namespace_name())
        .await
        .unwrap()
        .join(output.path.trim_start_matches("/outputs/"));
    assert_eq!(std::fs::metadata(&png).unwrap().len(), output.bytes);
}

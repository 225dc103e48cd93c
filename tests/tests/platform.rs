//! The whole platform as a user meets it: the real OpenID provider, the API and web page, the
//! operator, and the tenant's inference and outputs pods running the real binary with the tiny
//! model. Headless Chromium (Debian's package driven by npm `playwright-core`,
//! tests/browser/page.mjs) logs in, generates, watches the progress and finds the image in
//! "My images"; an admin opens the tenant's view. Screenshots are kept as test artifacts. Bearer
//! clients go through what needs the controller and the API together: a quota reset followed by
//! a new admission, and the history after the job objects are gone.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use atelier_crds::{GenerationJob, JobPhase, Tenant};
use atelier_tests::oidc::OidcProvider;
use atelier_tests::{TestCluster, paths, unique_name, wait_for};
use common::client::{Bearer, access_token};
use common::platform::{ApiProcess, free_port, start_provider};
use common::{Operator, create_tenant, wait_tenant_ready};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(180);

/// The operator, the OpenID provider and the API, shared by this binary's tests.
struct Platform {
    cluster: &'static TestCluster,
    _operator: Operator,
    provider: OidcProvider,
    api: ApiProcess,
}

async fn platform() -> &'static Platform {
    static PLATFORM: OnceCell<Platform> = OnceCell::const_new();
    PLATFORM
        .get_or_init(|| async {
            let cluster = TestCluster::shared().await;
            common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml").unwrap();
            let operator = Operator::start(cluster, &[]).unwrap();
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
            Platform {
                cluster,
                _operator: operator,
                provider,
                api,
            }
        })
        .await
}

impl Platform {
    async fn as_user(&self, user: &str) -> Bearer {
        let token = access_token(&self.provider.issuer, user).await.unwrap();
        Bearer::new(&self.api.url, &token)
    }

    /// A ready tenant with these members and quota.
    async fn tenant(&self, members: Value, quota: Value) -> Tenant {
        let tenant = create_tenant(self.cluster, json!({ "members": members, "quota": quota }))
            .await
            .unwrap();
        wait_tenant_ready(self.cluster, &tenant.name_any(), TIMEOUT)
            .await
            .unwrap();
        tenant
    }

    async fn delete(&self, tenant: &Tenant) {
        Api::<Tenant>::all(self.cluster.client().await)
            .delete(&tenant.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
}

/// Creates a job through the API and waits until the API reports it finished.
async fn generate(user: &Bearer, tenant: &str, prompt: &str) -> Value {
    let jobs = format!("/api/v1/tenants/{tenant}/generations");
    let body = json!({"prompt": prompt, "width": 256, "height": 256, "steps": 4});
    let (status, job) = user.post(&jobs, body).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let name = job["name"].as_str().unwrap().to_string();
    wait_for(&format!("job {name} finished"), TIMEOUT, || async {
        let (_, job) = user.get(&format!("{jobs}/{name}")).await?;
        let finished = ["Succeeded", "Failed", "Cancelled", "Rejected"]
            .contains(&job["phase"].as_str().unwrap_or_default());
        Ok(finished.then_some(job))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_page_logs_in_generates_with_the_tiny_model_and_shows_the_image() {
    let browser_dir = paths::workspace_root().join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists() && browser_dir.join("node_modules/playwright-core").exists(),
        "needs Debian's chromium ({chromium}) and `npm ci` in {}",
        browser_dir.display()
    );
    let platform = platform().await;
    let cluster = platform.cluster;
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

    let api = &platform.api;
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
    platform.delete(&tenant).await;
}

#[tokio::test]
async fn an_admins_quota_reset_through_the_api_lets_the_controller_admit_again() {
    let platform = platform().await;
    let tenant = platform
        .tenant(
            json!([{ "group": "team-q", "role": "user" }, { "user": "frank@example.com", "role": "admin" }]),
            json!({ "imagesPerUserPerDay": 1 }),
        )
        .await;
    let t = tenant.name_any();
    let (gina, frank) = (
        platform.as_user("gina").await,
        platform.as_user("frank").await,
    );
    let first = generate(&gina, &t, "the day's one image").await;
    assert_eq!(first["phase"], "Succeeded", "{first}");
    let jobs = format!("/api/v1/tenants/{t}/generations");
    let (status, refused) = gina
        .post(&jobs, json!({"prompt": "one more"}))
        .await
        .unwrap();
    assert_eq!(
        (status, refused["error"]["reason"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("QuotaExceeded")),
        "{refused}"
    );

    let (status, reset) = frank
        .post(
            &format!("/api/v1/tenants/{t}/quota/reset"),
            json!({"user": "gina@example.com"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{reset}");
    assert_eq!(reset["removedImages"], 1);
    // The controller, not only the API, admits her again: the job runs to its image.
    let again = generate(&gina, &t, "after the reset").await;
    assert_eq!(again["phase"], "Succeeded", "{again}");
    platform.delete(&tenant).await;
}

#[tokio::test]
async fn my_images_outlive_the_job_objects() {
    let platform = platform().await;
    let tenant = platform
        .tenant(json!([{ "group": "team-y", "role": "user" }]), json!({}))
        .await;
    let t = tenant.name_any();
    let dave = platform.as_user("dave").await;
    let prompt = format!("a lighthouse kept after its job {}", unique_name("p"));
    let job = generate(&dave, &t, &prompt).await;
    assert_eq!(job["phase"], "Succeeded", "{job}");
    // The job object goes (as its TTL or an admin would take it); the image stays in the history.
    let name = job["name"].as_str().unwrap();
    let jobs =
        Api::<GenerationJob>::namespaced(platform.cluster.client().await, &tenant.namespace_name());
    jobs.delete(name, &DeleteParams::default()).await.unwrap();
    wait_for("the job object gone", TIMEOUT, || async {
        Ok(jobs.get_opt(name).await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    let (status, page) = dave
        .get(&format!("/api/v1/tenants/{t}/images"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    let image = page["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["prompt"] == prompt.as_str())
        .unwrap_or_else(|| panic!("the image is not in the history: {page}"))
        .clone();
    let file = image["file"].as_str().unwrap();
    let png = dave
        .http
        .get(format!(
            "{}/api/v1/tenants/{t}/images/{file}",
            platform.api.url
        ))
        .bearer_auth(&dave.token)
        .send()
        .await
        .unwrap();
    assert_eq!(png.status(), StatusCode::OK);
    let bytes = png.bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    platform.delete(&tenant).await;
}

//! Projects isolate tenants. Project `beta` has jobs (one still running), task output,
//! an artifact, a blob and tokens; every token of project `alpha` is then sent at every
//! route of the API and must neither see nor change any of it, while the cluster admin
//! sees all. The routes come from the controller's own list, so a route added later
//! without a case here fails the matrix.

use drover_core::auth::{Project, Role, TokenView};
use drover_core::state::JobStatus;
use drover_core::{TaskState, api::JobView, api::NodeView, api::TaskView};
use drover_testkit::{ADMIN_TOKEN, AgentOptions, Api, JOIN_TOKEN, TestCluster, digest_of};
use reqwest::Method;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// What beta owns and alpha must not reach.
struct World {
    cluster: Api,
    /// alpha's tokens, by role.
    alpha: Vec<(Role, Api)>,
    beta: Api,
    beta_token_id: String,
    /// A finished task of beta's `b-out`, whose output is `BETA_OUTPUT`.
    beta_task: String,
    beta_digest: String,
    beta_bytes: Vec<u8>,
}

const BETA_OUTPUT: &str = "beta-secret-output";

impl World {
    fn alpha(&self, role: Role) -> &Api {
        &self
            .alpha
            .iter()
            .find(|(r, _)| *r == role)
            .expect("alpha has a token of every project role")
            .1
    }

    /// alpha's tokens that may change things.
    fn alpha_writers(&self) -> impl Iterator<Item = &Api> {
        [Role::Admin, Role::Write]
            .into_iter()
            .map(|r| self.alpha(r))
    }
}

async fn call(api: &Api, method: Method, path: &str, body: Option<&str>) -> (u16, String) {
    api.raw(method.clone(), path, body.map(|b| b.as_bytes().to_vec()))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Asserts a status; the message names the call and the role.
async fn expect(
    api: &Api,
    who: &str,
    method: Method,
    path: &str,
    body: Option<&str>,
    want: u16,
) -> String {
    let (status, text) = call(api, method.clone(), path, body).await;
    assert_eq!(status, want, "{who}: {method} {path}: {text}");
    text
}

const ALL_ROLES: [Role; 3] = [Role::Admin, Role::Write, Role::Read];

/// Sends one call with each of alpha's tokens of `roles`, asserting the status.
async fn as_alpha(
    w: &World,
    roles: &[Role],
    method: Method,
    path: &str,
    body: Option<&str>,
    want: u16,
) {
    for r in roles {
        expect(
            w.alpha(*r),
            &format!("alpha {r}"),
            method.clone(),
            path,
            body,
            want,
        )
        .await;
    }
}

/// Nothing of beta may appear in what alpha is shown.
fn assert_no_beta(who: &str, path: &str, body: &str, w: &World) {
    for needle in [
        "\"beta\"",
        "b-out",
        "b-svc",
        // alpha's own job names b-art:1 (and finds nothing); beta's artifact would
        // show as an object of that name.
        "\"name\":\"b-art\"",
        "b-pipe",
        BETA_OUTPUT,
        w.beta_task.as_str(),
        w.beta_digest.as_str(),
        w.beta_token_id.as_str(),
    ] {
        assert!(
            !body.contains(needle),
            "{who}: GET {path} shows beta's {needle:?}: {body}"
        );
    }
}

async fn setup(c: &TestCluster) -> World {
    let cluster = c.api();
    for p in ["alpha", "beta"] {
        cluster.create_project(p).await.unwrap();
    }
    let mut alpha = Vec::new();
    for role in [Role::Admin, Role::Write, Role::Read] {
        let t = cluster.create_token("alpha", role).await.unwrap();
        assert_eq!(t.view.project.as_str(), "alpha");
        alpha.push((role, Api::new(&c.url, &t.token)));
    }
    let bt = cluster.create_token("beta", Role::Write).await.unwrap();
    let beta = Api::new(&c.url, &bt.token);

    beta.apply_yaml(&format!(
        "name: b-out\nruntime: process\ncommand: [sh, -c, 'echo {BETA_OUTPUT}']\n"
    ))
    .await
    .unwrap();
    beta.apply_yaml("name: shared\nruntime: process\ncommand: ['true']\n")
        .await
        .unwrap();
    beta.apply_yaml("name: b-svc\nkind: service\nruntime: process\ncommand: [sleep, '300']\n")
        .await
        .unwrap();
    let (job, tasks) = beta.wait_final("b-out", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete);
    assert!(beta.logs("b-out").await.unwrap().contains(BETA_OUTPUT));
    beta.wait_final("shared", T).await.unwrap();
    beta.wait_running("b-svc", T).await.unwrap();
    // A pipeline whose sink may not run (max 0), so it adds no task to beta, with
    // messages waiting in its buffer.
    let (status, body) = beta
        .raw(
            Method::POST,
            "/v1/pipelines",
            Some(pipeline_json("b-pipe").into_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = beta
        .raw(
            Method::POST,
            "/v1/pipelines/b-pipe/vertices/in/messages",
            Some(MESSAGES.as_bytes().to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let beta_bytes = b"beta's private build".to_vec();
    beta.push_artifact("b-art", &[("any", &beta_bytes)])
        .await
        .unwrap();
    World {
        cluster,
        alpha,
        beta,
        beta_token_id: bt.view.id,
        beta_task: tasks[0].task.id.to_string(),
        beta_digest: digest_of(&beta_bytes),
        beta_bytes,
    }
}

const MESSAGES: &str = r#"{"messages":[{"data":"beta's message"}]}"#;

/// A pipeline of an http source and a sink that never runs.
fn pipeline_json(name: &str) -> String {
    let yaml = format!(
        "name: {name}\nvertices:\n  - {{ name: in, source: {{ http: {{}} }} }}\n  - {{ name: out, sink: {{ run: {{ runtime: process, command: [sleep, '600'] }} }}, scale: {{ min: 0, max: 0 }} }}\nedges: [{{ from: in, to: out }}]\n"
    );
    let spec = drover_core::pipeline::PipelineSpec::from_yaml(&yaml, "p.yaml").unwrap();
    serde_json::to_string(&spec).unwrap()
}

/// beta's pipeline as beta sees it: running, asked nothing, its message still pending.
async fn assert_beta_pipeline_untouched(w: &World) {
    let (status, body) = call(&w.beta, Method::GET, "/v1/pipelines/b-pipe", None).await;
    assert_eq!(status, 200, "{body}");
    let v: drover_core::pipeline::PipelineView = serde_json::from_str(&body).unwrap();
    assert_eq!(v.pipeline.project.as_str(), "beta");
    assert_eq!(v.pipeline.version, 1, "{body}");
    assert_eq!(
        v.pipeline.spec.lifecycle.desired_phase,
        drover_core::pipeline::DesiredPhase::Running,
        "{body}"
    );
    assert!(v.pipeline.request.is_none(), "{body}");
    let pending: u64 = v
        .vertices
        .iter()
        .flat_map(|x| &x.buffers)
        .filter_map(|b| b.pending)
        .sum();
    assert_eq!(pending, 1, "{body}");
}

/// Checks one route. Every route of the controller must have an arm here.
async fn check_route(w: &World, method: &str, pattern: &str) {
    let all_alpha = ALL_ROLES;
    match (method, pattern) {
        ("POST", "/v1/jobs") => {
            // A job of the same name in alpha is alpha's own; beta's is untouched.
            let spec = r#"{"name":"shared","command":["true"],"runtime":"process"}"#;
            expect(
                w.alpha(Role::Read),
                "alpha read",
                Method::POST,
                pattern,
                Some(spec),
                403,
            )
            .await;
            expect(
                w.alpha(Role::Write),
                "alpha write",
                Method::POST,
                pattern,
                Some(spec),
                201,
            )
            .await;
            let mine = w
                .alpha(Role::Write)
                .wait_final("shared", T)
                .await
                .unwrap()
                .0;
            assert_eq!(mine.job.project.as_str(), "alpha");
            let theirs = w.beta.job("shared").await.unwrap();
            assert_eq!(
                (theirs.job.version, theirs.job.project.as_str()),
                (1, "beta")
            );
            // alpha cannot run beta's artifact: in alpha the name does not exist.
            let spec = r#"{"name":"steal","command":["./b-art"],"runtime":"process","artifact":"b-art:1"}"#;
            expect(
                w.alpha(Role::Admin),
                "alpha admin",
                Method::POST,
                pattern,
                Some(spec),
                201,
            )
            .await;
            let (job, tasks) = w
                .alpha(Role::Admin)
                .wait_job("steal", T, |j, _| j.pending_reason.is_some())
                .await
                .unwrap();
            let reason = job.pending_reason.unwrap_or_default();
            assert!(reason.contains("b-art:1 does not exist"), "{reason}");
            assert!(tasks.iter().all(|t| t.task.state == TaskState::Pending));
            w.alpha(Role::Admin).stop("steal").await.unwrap();
        }
        ("POST", "/v1/plan") => {
            // A plan of beta's job names in alpha plans alpha's own job: to create,
            // compared with nothing of beta's, and it changes nothing of beta's.
            let spec =
                r#"{"name":"b-svc","kind":"service","command":["sleep","1"],"runtime":"process"}"#;
            expect(
                w.alpha(Role::Read),
                "alpha read",
                Method::POST,
                pattern,
                Some(spec),
                403,
            )
            .await;
            for (who, a) in [
                ("alpha admin", w.alpha(Role::Admin)),
                ("alpha write", w.alpha(Role::Write)),
            ] {
                let body = expect(a, who, Method::POST, pattern, Some(spec), 200).await;
                let plan: drover_core::api::PlanResponse = serde_json::from_str(&body).unwrap();
                assert_eq!(
                    plan.action,
                    drover_core::api::PlanAction::Create,
                    "{who}: {body}"
                );
                assert!(plan.changes.is_empty(), "{who}: {body}");
                assert_eq!(plan.project.as_str(), "alpha", "{who}: {body}");
                assert_no_beta(who, pattern, &body.replace("b-svc", "the-name"), w);
                // beta's uploaded archive is not alpha's to use: the plan says it is
                // missing, as apply would refuse it.
                let with_blob = format!(
                    r#"{{"name":"b-out","command":["true"],"runtime":"process","runtime_env":{{"working_dir":"{}"}}}}"#,
                    w.beta_digest
                );
                let body = expect(a, who, Method::POST, pattern, Some(&with_blob), 200).await;
                let plan: drover_core::api::PlanResponse = serde_json::from_str(&body).unwrap();
                assert_eq!(
                    plan.action,
                    drover_core::api::PlanAction::Create,
                    "{who}: {body}"
                );
                assert_eq!(
                    plan.missing_blob.as_deref(),
                    Some(w.beta_digest.as_str()),
                    "{who}: {body}"
                );
            }
            let svc = w.beta.job("b-svc").await.unwrap();
            assert_eq!(
                (svc.job.version, svc.job.status),
                (1, JobStatus::Running),
                "beta's service is untouched"
            );
            // The cluster admin, acting in beta, plans beta's job as an update.
            let in_beta = w.cluster.clone().in_project("beta");
            let body = expect(
                &in_beta,
                "cluster in beta",
                Method::POST,
                pattern,
                Some(spec),
                200,
            )
            .await;
            assert!(body.contains(r#""action":"update""#), "{body}");
        }
        ("GET", "/v1/jobs") | ("GET", "/v1/tasks") | ("GET", "/v1/artifacts") => {
            for r in all_alpha {
                let body = expect(
                    w.alpha(r),
                    &format!("alpha {r}"),
                    Method::GET,
                    pattern,
                    None,
                    200,
                )
                .await;
                assert_no_beta(&format!("alpha {r}"), pattern, &body, w);
            }
            let body = expect(&w.cluster, "cluster", Method::GET, pattern, None, 200).await;
            assert!(
                body.contains("\"beta\""),
                "the cluster admin sees beta: {body}"
            );
            // A job filter naming beta's job finds nothing.
            if pattern == "/v1/tasks" {
                as_alpha(w, &ALL_ROLES, Method::GET, "/v1/tasks?job=b-out", None, 404).await;
                let all = "/v1/tasks?job=b-out&versions=all";
                as_alpha(w, &ALL_ROLES, Method::GET, all, None, 404).await;
                // Every version of every job is still only the caller's own.
                for r in all_alpha {
                    let path = "/v1/tasks?versions=all";
                    let body = expect(
                        w.alpha(r),
                        &format!("alpha {r}"),
                        Method::GET,
                        path,
                        None,
                        200,
                    )
                    .await;
                    assert_no_beta(&format!("alpha {r}"), path, &body, w);
                }
                // A wrong value is refused, naming the parameter.
                let body = expect(
                    &w.cluster,
                    "cluster",
                    Method::GET,
                    "/v1/tasks?versions=old",
                    None,
                    400,
                )
                .await;
                assert!(body.contains("versions: expected all or current"), "{body}");
            }
        }
        ("GET", "/v1/jobs/{name}")
        | ("GET", "/v1/jobs/{name}/logs")
        | ("GET", "/v1/jobs/{name}/versions") => {
            let paths = [
                pattern.replace("{name}", "b-out"),
                pattern.replace("{name}", "b-out") + "?follow=true",
            ];
            for path in &paths[..if pattern.ends_with("logs") { 2 } else { 1 }] {
                for r in all_alpha {
                    let body = expect(
                        w.alpha(r),
                        &format!("alpha {r}"),
                        Method::GET,
                        path,
                        None,
                        404,
                    )
                    .await;
                    // The answer is the one for a name no project uses.
                    let nobody = path.replace("b-out", "no-such-job");
                    let (_, other) = call(w.alpha(r), Method::GET, &nobody, None).await;
                    assert_eq!(body.replace("b-out", "no-such-job"), other, "alpha {r}");
                }
            }
            let body = expect(&w.cluster, "cluster", Method::GET, &paths[0], None, 200).await;
            if pattern.ends_with("logs") {
                assert!(body.contains(BETA_OUTPUT), "{body}");
            }
        }
        ("POST", "/v1/jobs/{name}/stop") => {
            let path = pattern.replace("{name}", "b-svc");
            expect(
                w.alpha(Role::Read),
                "alpha read",
                Method::POST,
                &path,
                None,
                403,
            )
            .await;
            for a in w.alpha_writers() {
                expect(a, "alpha writer", Method::POST, &path, None, 404).await;
            }
            let svc = w.beta.job("b-svc").await.unwrap();
            assert_eq!(
                svc.job.status,
                JobStatus::Running,
                "beta's service still runs"
            );
        }
        ("DELETE", "/v1/jobs/{name}") => {
            // beta's finished job: removable by beta, unseen by alpha.
            let path = pattern.replace("{name}", "b-out");
            expect(
                w.alpha(Role::Read),
                "alpha read",
                Method::DELETE,
                &path,
                None,
                403,
            )
            .await;
            for a in w.alpha_writers() {
                expect(a, "alpha writer", Method::DELETE, &path, None, 404).await;
            }
            let out = w.beta.job("b-out").await.unwrap();
            assert_eq!(
                out.job.status,
                JobStatus::Complete,
                "beta's job is still there"
            );
        }
        ("GET", "/v1/tasks/{id}") | ("GET", "/v1/tasks/{id}/logs") => {
            // Neither the whole id nor a prefix of it finds beta's task.
            let prefix = &w.beta_task[..w.beta_task.len() - 4];
            for id in [w.beta_task.as_str(), prefix] {
                let path = pattern.replace("{id}", id);
                as_alpha(w, &ALL_ROLES, Method::GET, &path, None, 404).await;
            }
            let path = pattern.replace("{id}", &w.beta_task);
            let body = expect(&w.cluster, "cluster", Method::GET, &path, None, 200).await;
            if pattern.ends_with("logs") {
                assert!(body.contains(BETA_OUTPUT), "{body}");
            }
        }
        ("GET", "/v1/nodes") => {
            // Nodes are shared, but alpha does not learn how many of beta's tasks run
            // there: beta's service is the one task running.
            let count = |body: &str| -> u32 {
                let nodes: Vec<NodeView> = serde_json::from_str(body).unwrap();
                nodes.iter().map(|n| n.tasks).sum()
            };
            for r in all_alpha {
                let body = expect(
                    w.alpha(r),
                    &format!("alpha {r}"),
                    Method::GET,
                    pattern,
                    None,
                    200,
                )
                .await;
                assert_eq!(count(&body), 0, "alpha {r}: {body}");
            }
            let body = expect(&w.cluster, "cluster", Method::GET, pattern, None, 200).await;
            assert_eq!(count(&body), 1, "{body}");
        }
        ("DELETE", "/v1/nodes/{node}") => {
            // Nodes serve every project: no project token may remove one, not even a
            // project admin's. The cluster admin may, but not while it is connected.
            let path = pattern.replace("{node}", "n1");
            as_alpha(w, &ALL_ROLES, Method::DELETE, &path, None, 403).await;
            let body = expect(&w.cluster, "cluster", Method::DELETE, &path, None, 409).await;
            assert!(body.contains("is connected"), "{body}");
            let nodes = w.cluster.nodes().await.unwrap();
            assert_eq!(nodes.len(), 1, "{nodes:?}");
        }
        ("GET", "/v1/envs") | ("POST", "/v1/envs/prune") | ("GET", "/metrics") => {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            as_alpha(w, &ALL_ROLES, m.clone(), pattern, None, 403).await;
            expect(&w.cluster, "cluster", m, pattern, None, 200).await;
        }
        ("PUT", "/v1/blobs/{digest}") => {
            // Naming beta's digest without its bytes proves nothing and grants nothing.
            let (status, body) = w
                .alpha(Role::Write)
                .put_blob(&w.beta_digest, b"guess".to_vec())
                .await
                .unwrap();
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("digest_mismatch"), "{body}");
            let (status, body) = w
                .alpha(Role::Read)
                .put_blob(&w.beta_digest, w.beta_bytes.clone())
                .await
                .unwrap();
            assert_eq!(status, 403, "{body}");
            assert_eq!(
                w.alpha(Role::Write)
                    .head_blob(&w.beta_digest)
                    .await
                    .unwrap()
                    .0,
                404
            );
            assert_eq!(
                std::str::from_utf8(&w.beta.get_blob(&w.beta_digest).await.unwrap().1).unwrap(),
                "beta's private build"
            );
        }
        ("HEAD", "/v1/blobs/{digest}") => {
            for r in all_alpha {
                assert_eq!(
                    w.alpha(r).head_blob(&w.beta_digest).await.unwrap().0,
                    404,
                    "alpha {r}"
                );
            }
            assert_eq!(w.cluster.head_blob(&w.beta_digest).await.unwrap().0, 200);
            assert_eq!(w.beta.head_blob(&w.beta_digest).await.unwrap().0, 200);
        }
        ("GET", "/v1/blobs/{digest}") => {
            for r in all_alpha {
                let (status, body) = w.alpha(r).get_blob(&w.beta_digest).await.unwrap();
                assert_eq!(status, 404, "alpha {r}");
                assert!(!body.windows(w.beta_bytes.len()).any(|b| b == w.beta_bytes));
            }
            assert_eq!(
                w.cluster.get_blob(&w.beta_digest).await.unwrap(),
                (200, w.beta_bytes.clone())
            );
        }
        ("POST", "/v1/artifacts") => {
            let body = serde_json::json!({
                "name": "mine", "version": "1",
                "variants": [{ "platform": "any", "digest": w.beta_digest, "size": w.beta_bytes.len() }],
            });
            let (status, text) = w.alpha(Role::Read).create_artifact(&body).await.unwrap();
            assert_eq!(status, 403, "{text}");
            for a in w.alpha_writers() {
                let (status, text) = a.create_artifact(&body).await.unwrap();
                assert_eq!(status, 400, "{text}");
                assert!(text.contains("has not been uploaded"), "{text}");
            }
        }
        ("GET", "/v1/artifacts/{name}/{version}")
        | ("DELETE", "/v1/artifacts/{name}/{version}") => {
            let path = "/v1/artifacts/b-art/1";
            if method == "GET" {
                as_alpha(w, &ALL_ROLES, Method::GET, path, None, 404).await;
                expect(&w.cluster, "cluster", Method::GET, path, None, 200).await;
            } else {
                expect(
                    w.alpha(Role::Read),
                    "alpha read",
                    Method::DELETE,
                    path,
                    None,
                    403,
                )
                .await;
                for a in w.alpha_writers() {
                    expect(a, "alpha writer", Method::DELETE, path, None, 404).await;
                }
                expect(&w.beta, "beta", Method::GET, path, None, 200).await;
            }
        }
        ("POST", "/v1/projects") => {
            as_alpha(
                w,
                &ALL_ROLES,
                Method::POST,
                pattern,
                Some(r#"{"name":"mine"}"#),
                403,
            )
            .await;
            expect(
                &w.cluster,
                "cluster",
                Method::POST,
                pattern,
                Some(r#"{"name":"gamma"}"#),
                201,
            )
            .await;
            expect(
                &w.cluster,
                "cluster",
                Method::POST,
                pattern,
                Some(r#"{"name":"gamma"}"#),
                409,
            )
            .await;
        }
        ("GET", "/v1/projects") => {
            let names = |body: &str| -> Vec<String> {
                let list: Vec<Project> = serde_json::from_str(body).unwrap();
                list.into_iter().map(|p| p.name.to_string()).collect()
            };
            for r in all_alpha {
                let body = expect(
                    w.alpha(r),
                    &format!("alpha {r}"),
                    Method::GET,
                    pattern,
                    None,
                    200,
                )
                .await;
                assert_eq!(names(&body), ["alpha"], "alpha {r}");
            }
            let body = expect(&w.cluster, "cluster", Method::GET, pattern, None, 200).await;
            let all = names(&body);
            for p in ["alpha", "beta", "default"] {
                assert!(all.iter().any(|n| n == p), "{p} in {all:?}");
            }
        }
        ("POST", "/v1/tokens") => {
            let for_beta = r#"{"project":"beta","role":"write"}"#;
            expect(
                w.alpha(Role::Admin),
                "alpha admin",
                Method::POST,
                pattern,
                Some(for_beta),
                404,
            )
            .await;
            as_alpha(
                w,
                &[Role::Write, Role::Read],
                Method::POST,
                pattern,
                Some(r#"{"role":"read"}"#),
                403,
            )
            .await;
            // A project admin makes its own project's tokens, but no cluster ones.
            let text = expect(
                w.alpha(Role::Admin),
                "alpha admin",
                Method::POST,
                pattern,
                Some(r#"{"role":"read"}"#),
                201,
            )
            .await;
            assert!(
                text.contains("\"project\": \"alpha\"") || text.contains("\"project\":\"alpha\""),
                "{text}"
            );
            expect(
                w.alpha(Role::Admin),
                "alpha admin",
                Method::POST,
                pattern,
                Some(r#"{"role":"cluster"}"#),
                403,
            )
            .await;
        }
        ("GET", "/v1/tokens") => {
            let body = expect(
                w.alpha(Role::Admin),
                "alpha admin",
                Method::GET,
                pattern,
                None,
                200,
            )
            .await;
            let list: Vec<TokenView> = serde_json::from_str(&body).unwrap();
            assert!(
                !list.is_empty() && list.iter().all(|t| t.project.as_str() == "alpha"),
                "{body}"
            );
            assert!(
                !body.contains("drv_"),
                "listings never show secrets: {body}"
            );
            as_alpha(
                w,
                &[Role::Write, Role::Read],
                Method::GET,
                pattern,
                None,
                403,
            )
            .await;
            let body = expect(&w.cluster, "cluster", Method::GET, pattern, None, 200).await;
            assert!(body.contains(&w.beta_token_id), "{body}");
        }
        ("POST", "/v1/tokens/{id}/revoke") => {
            let path = pattern.replace("{id}", &w.beta_token_id);
            expect(
                w.alpha(Role::Admin),
                "alpha admin",
                Method::POST,
                &path,
                None,
                404,
            )
            .await;
            as_alpha(
                w,
                &[Role::Write, Role::Read],
                Method::POST,
                &path,
                None,
                403,
            )
            .await;
            expect(&w.beta, "beta", Method::GET, "/v1/jobs", None, 200).await;
        }
        ("POST", "/v1/pipelines") => {
            // A pipeline of beta's name in alpha is alpha's own; beta's is untouched.
            let spec = pipeline_json("b-pipe");
            expect(
                w.alpha(Role::Read),
                "alpha read",
                Method::POST,
                pattern,
                Some(&spec),
                403,
            )
            .await;
            let body = expect(
                w.alpha(Role::Write),
                "alpha write",
                Method::POST,
                pattern,
                Some(&spec),
                201,
            )
            .await;
            assert!(body.contains("\"project\":\"alpha\""), "{body}");
            assert_beta_pipeline_untouched(w).await;
            // alpha removes its own again, which leaves beta's alone.
            let path = "/v1/pipelines/b-pipe";
            expect(
                w.alpha(Role::Write),
                "alpha write",
                Method::DELETE,
                path,
                None,
                200,
            )
            .await;
            drover_testkit::wait_for("alpha's pipeline to go", T, async || {
                call(w.alpha(Role::Write), Method::GET, path, None).await.0 == 404
            })
            .await
            .unwrap();
            assert_beta_pipeline_untouched(w).await;
        }
        ("GET", "/v1/pipelines") => {
            for r in all_alpha {
                let who = format!("alpha {r}");
                let body = expect(w.alpha(r), &who, Method::GET, pattern, None, 200).await;
                assert_no_beta(&who, pattern, &body, w);
            }
            let body = expect(&w.cluster, "cluster", Method::GET, pattern, None, 200).await;
            assert!(
                body.contains("b-pipe"),
                "the cluster admin sees beta's: {body}"
            );
        }
        ("GET", "/v1/pipelines/{name}") => {
            let path = pattern.replace("{name}", "b-pipe");
            for r in all_alpha {
                let body = expect(
                    w.alpha(r),
                    &format!("alpha {r}"),
                    Method::GET,
                    &path,
                    None,
                    404,
                )
                .await;
                let nobody = path.replace("b-pipe", "no-such-pipe");
                let (_, other) = call(w.alpha(r), Method::GET, &nobody, None).await;
                assert_eq!(body.replace("b-pipe", "no-such-pipe"), other, "alpha {r}");
            }
            expect(&w.cluster, "cluster", Method::GET, &path, None, 200).await;
        }
        ("DELETE", "/v1/pipelines/{name}")
        | ("POST", "/v1/pipelines/{name}/pause")
        | ("POST", "/v1/pipelines/{name}/resume")
        | ("POST", "/v1/pipelines/{name}/vertices/{vertex}/messages") => {
            let path = pattern
                .replace("{name}", "b-pipe")
                .replace("{vertex}", "in");
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let body = pattern.ends_with("messages").then_some(MESSAGES);
            expect(
                w.alpha(Role::Read),
                "alpha read",
                m.clone(),
                &path,
                body,
                403,
            )
            .await;
            for a in w.alpha_writers() {
                expect(a, "alpha writer", m.clone(), &path, body, 404).await;
            }
            assert_beta_pipeline_untouched(w).await;
        }
        _ => panic!(
            "route {method} {pattern} has no case in the project isolation matrix; add one to check_route"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_project_token_sees_or_changes_another_projects_objects_on_any_route() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let w = setup(&c).await;
    for (method, pattern) in drover_controller::ROUTES {
        check_route(&w, method, pattern).await;
    }

    // A project token cannot step into another project by naming it.
    let alpha_in_beta = Api::new(&c.url, &w.alpha(Role::Admin).token).in_project("beta");
    let (status, body) = call(&alpha_in_beta, Method::GET, "/v1/jobs", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("belongs to project alpha"), "{body}");
    // The cluster admin naming a project sees only it.
    let in_beta = Api::new(&c.url, &w.cluster.token).in_project("beta");
    let jobs: Vec<JobView> =
        serde_json::from_str(&call(&in_beta, Method::GET, "/v1/jobs", None).await.1).unwrap();
    assert!(!jobs.is_empty() && jobs.iter().all(|j| j.job.project.as_str() == "beta"));
    let tasks: Vec<TaskView> =
        serde_json::from_str(&call(&in_beta, Method::GET, "/v1/tasks", None).await.1).unwrap();
    assert!(tasks.iter().all(|t| t.task.project.as_str() == "beta"));
    // ... and may stop beta's service, which no alpha token could.
    expect(
        &in_beta,
        "cluster in beta",
        Method::POST,
        "/v1/jobs/b-svc/stop",
        None,
        200,
    )
    .await;
    let (status, _) = call(
        &Api::new(&c.url, &w.cluster.token).in_project("nope"),
        Method::GET,
        "/v1/jobs",
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_stored_hashed_and_a_revoked_one_stays_revoked_after_a_restart() {
    let c = TestCluster::start().await.unwrap();
    let cluster = c.api();
    cluster.create_project("alpha").await.unwrap();
    let admin = cluster.create_token("alpha", Role::Admin).await.unwrap();
    let reader = Api::new(&c.url, &admin.token)
        .create_token("alpha", Role::Read)
        .await
        .unwrap();
    let read_api = Api::new(&c.url, &reader.token);
    expect(&read_api, "reader", Method::GET, "/v1/jobs", None, 200).await;

    // The project admin revokes the reader: its next request is refused.
    let path = format!("/v1/tokens/{}/revoke", reader.view.id);
    let text = expect(
        &Api::new(&c.url, &admin.token),
        "alpha admin",
        Method::POST,
        &path,
        None,
        200,
    )
    .await;
    assert!(
        text.contains("\"revoked\": true") || text.contains("\"revoked\":true"),
        "{text}"
    );
    let text = expect(
        &read_api,
        "revoked reader",
        Method::GET,
        "/v1/jobs",
        None,
        401,
    )
    .await;
    assert!(text.contains("revoked"), "{text}");

    // Neither secret is anywhere in the controller's files; their hashes are.
    let dir = c.stop().await;
    let mut stored = Vec::new();
    for entry in walk(dir.path()) {
        stored.extend(std::fs::read(&entry).unwrap_or_default());
    }
    for secret in [&admin.token, &reader.token] {
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret was written to disk"
        );
    }
    assert!(stored.windows(12).any(|w| w == reader.view.id.as_bytes()));

    // After a restart the revocation holds and the admin token still works.
    let c = TestCluster::start_in(dir, Default::default(), "127.0.0.1:0")
        .await
        .unwrap();
    expect(
        &Api::new(&c.url, &reader.token),
        "revoked reader",
        Method::GET,
        "/v1/jobs",
        None,
        401,
    )
    .await;
    let body = expect(
        &Api::new(&c.url, &admin.token),
        "alpha admin",
        Method::GET,
        "/v1/tokens",
        None,
        200,
    )
    .await;
    let list: Vec<TokenView> = serde_json::from_str(&body).unwrap();
    let r = list.iter().find(|t| t.id == reader.view.id).unwrap();
    assert!(r.revoked);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_project_and_token_requests_are_refused_with_the_field_named() {
    let c = TestCluster::start().await.unwrap();
    let admin = c.api();
    for (path, body, needle) in [
        ("/v1/projects", r#"{"name":"Team_A"}"#, "name: project name"),
        ("/v1/projects", r#"{"nme":"a"}"#, "unknown field `nme`"),
        ("/v1/projects", "not json", "invalid project"),
        ("/v1/tokens", r#"{"role":"root"}"#, "unknown variant `root`"),
        (
            "/v1/tokens",
            r#"{"project":"default"}"#,
            "missing field `role`",
        ),
    ] {
        let text = expect(&admin, "cluster", Method::POST, path, Some(body), 400).await;
        assert!(text.contains(needle), "{path} {body}: {text}");
    }
    // A token for a project that does not exist names it and how to make it.
    let text = expect(
        &admin,
        "cluster",
        Method::POST,
        "/v1/tokens",
        Some(r#"{"project":"nope","role":"read"}"#),
        404,
    )
    .await;
    assert!(text.contains("drover project create nope"), "{text}");
    // So does a cluster admin naming one in the header.
    let in_nope = Api::new(&c.url, &admin.token).in_project("nope");
    let text = expect(
        &in_nope,
        "cluster in nope",
        Method::GET,
        "/v1/jobs",
        None,
        404,
    )
    .await;
    assert!(text.contains("drover project create nope"), "{text}");
    let (_, projects) = call(&admin, Method::GET, "/v1/projects", None).await;
    let list: Vec<Project> = serde_json::from_str(&projects).unwrap();
    assert_eq!(list.len(), 1, "nothing was created: {projects}");
}

/// The public id of a token `TestCluster` bootstraps, as listings show it.
fn id_of(secret: &str) -> String {
    drover_store::hash_token(secret)[..drover_store::TOKEN_ID_LEN].to_string()
}

/// The lock-out of issue 11: the cluster admin and join tokens are filed under project
/// `default`, yet an admin of `default` must neither see nor revoke them; and no one may
/// revoke the last cluster admin token, while a cluster admin may still revoke any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_admin_of_default_cannot_lock_the_cluster_admin_out() {
    let c = TestCluster::start().await.unwrap();
    let cluster = c.api();
    let (admin_id, join_id) = (id_of(ADMIN_TOKEN), id_of(JOIN_TOKEN));
    let made = cluster.create_token("default", Role::Admin).await.unwrap();
    let default_admin = Api::new(&c.url, &made.token);

    // It lists its project's tokens, but not the cluster-level ones filed there.
    let body = expect(
        &default_admin,
        "default admin",
        Method::GET,
        "/v1/tokens",
        None,
        200,
    )
    .await;
    let list: Vec<TokenView> = serde_json::from_str(&body).unwrap();
    assert!(list.iter().any(|t| t.id == made.view.id), "{body}");
    for t in &list {
        assert!(
            !t.role.is_cluster_level() && t.id != admin_id && t.id != join_id,
            "a project admin is shown a cluster-level token: {body}"
        );
    }
    // Nor may it make one.
    for role in ["cluster", "agent"] {
        expect(
            &default_admin,
            "default admin",
            Method::POST,
            "/v1/tokens",
            Some(&format!(r#"{{"role":"{role}"}}"#)),
            403,
        )
        .await;
    }

    // Revoking them answers exactly as for an id that does not exist.
    let (_, unknown) = call(
        &default_admin,
        Method::POST,
        "/v1/tokens/0123456789ab/revoke",
        None,
    )
    .await;
    for id in [&admin_id, &join_id] {
        let body = expect(
            &default_admin,
            "default admin",
            Method::POST,
            &format!("/v1/tokens/{id}/revoke"),
            None,
            404,
        )
        .await;
        assert_eq!(body.replace(id.as_str(), "0123456789ab"), unknown);
    }
    // Both still work: the cluster admin lists them unrevoked, and an agent joins.
    let body = expect(&cluster, "cluster", Method::GET, "/v1/tokens", None, 200).await;
    let list: Vec<TokenView> = serde_json::from_str(&body).unwrap();
    for (id, role) in [(&admin_id, Role::Cluster), (&join_id, Role::Agent)] {
        let t = list.iter().find(|t| &t.id == id).unwrap_or_else(|| {
            panic!("the cluster admin lists the {role} token: {body}");
        });
        assert_eq!((t.role, t.revoked), (role, false), "{body}");
    }
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    drover_testkit::wait_for("the agent to join with the join token", T, async || {
        cluster.nodes().await.map(|n| n.len() == 1).unwrap_or(false)
    })
    .await
    .unwrap();

    // The last cluster admin token cannot be revoked, even by itself.
    let path = format!("/v1/tokens/{admin_id}/revoke");
    let body = expect(&cluster, "cluster", Method::POST, &path, None, 409).await;
    assert!(
        body.contains("last active cluster admin token")
            && body.contains("drover token create --role cluster"),
        "{body}"
    );
    expect(&cluster, "cluster", Method::GET, "/v1/jobs", None, 200).await;

    // Another cluster admin token can be revoked...
    let second = cluster
        .create_token("default", Role::Cluster)
        .await
        .unwrap();
    let path2 = format!("/v1/tokens/{}/revoke", second.view.id);
    expect(&cluster, "cluster", Method::POST, &path2, None, 200).await;
    let second = Api::new(&c.url, &second.token);
    expect(
        &second,
        "revoked second",
        Method::GET,
        "/v1/jobs",
        None,
        401,
    )
    .await;
    // ... and so can the first, by a third, which is then the last.
    let third = cluster
        .create_token("default", Role::Cluster)
        .await
        .unwrap();
    let third_api = Api::new(&c.url, &third.token);
    expect(&third_api, "third", Method::POST, &path, None, 200).await;
    expect(
        &cluster,
        "revoked first",
        Method::GET,
        "/v1/jobs",
        None,
        401,
    )
    .await;
    let path3 = format!("/v1/tokens/{}/revoke", third.view.id);
    expect(&third_api, "third", Method::POST, &path3, None, 409).await;
}

/// The last-token check and the revocation happen under one lock: cluster admin tokens
/// revoking themselves all at once leave exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revocations_never_revoke_the_last_cluster_admin_token() {
    let c = TestCluster::start().await.unwrap();
    let cluster = c.api();
    let mut tokens = vec![(id_of(ADMIN_TOKEN), cluster.clone())];
    for _ in 0..15 {
        let t = cluster
            .create_token("default", Role::Cluster)
            .await
            .unwrap();
        tokens.push((t.view.id, Api::new(&c.url, &t.token)));
    }
    let calls = tokens.iter().map(|(id, api)| async move {
        call(api, Method::POST, &format!("/v1/tokens/{id}/revoke"), None)
            .await
            .0
    });
    let mut statuses = futures_util::future::join_all(calls).await;
    statuses.sort();
    let mut want = vec![200; tokens.len() - 1];
    want.push(409);
    assert_eq!(statuses, want);
    // Exactly one token still works, and it lists itself as the one active cluster
    // admin token.
    let mut survivors = Vec::new();
    for (id, api) in &tokens {
        let (status, body) = call(api, Method::GET, "/v1/tokens", None).await;
        if status == 200 {
            survivors.push((id, body));
        }
    }
    assert_eq!(survivors.len(), 1, "{survivors:?}");
    let (id, body) = &survivors[0];
    let list: Vec<TokenView> = serde_json::from_str(body).unwrap();
    let active: Vec<&str> = list
        .iter()
        .filter(|t| t.role == Role::Cluster && !t.revoked)
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(active, [id.as_str()], "{body}");
}

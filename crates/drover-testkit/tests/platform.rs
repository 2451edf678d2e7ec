//! The platform an agent reports at registration, as the API shows it.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reports_its_amd64_level_libc_and_uname() {
    use drover_core::TaskState;
    use drover_core::platform::{LibcKind, Platform};
    use drover_testkit::{AgentOptions, TestCluster, wait_for};
    const T: std::time::Duration = std::time::Duration::from_secs(20);

    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let mut nodes = Vec::new();
    wait_for("the agent to register", T, async || {
        nodes = api.nodes().await.unwrap_or_default();
        !nodes.is_empty()
    })
    .await
    .unwrap();
    let info = &nodes[0].node.info;

    let platform: Platform = info.platform.parse().unwrap();
    let level = platform.variant.map(|v| v.major());
    assert!(
        info.platform.starts_with("linux/amd64/v") && level.is_some_and(|l| (1..=4).contains(&l)),
        "{info:?}"
    );
    assert_eq!((info.os(), info.arch()), ("linux", "amd64"));
    assert_eq!(info.agent_arch, "amd64");
    let uname = info.uname.as_ref().unwrap();
    assert_eq!(
        (uname.sysname.as_str(), uname.machine.as_str()),
        ("Linux", "x86_64")
    );
    if cfg!(target_env = "gnu") {
        assert_eq!(info.libc.as_ref().unwrap().kind, LibcKind::Gnu, "{info:?}");
    }

    // Constraints on os and arch compare those alone, not the variant.
    api.apply_yaml(
        "name: placed\nkind: service\nruntime: mock\n\
         constraints:\n  - { key: os, value: linux }\n  - { key: arch, value: amd64 }\n",
    )
    .await
    .unwrap();
    api.wait_running("placed", T).await.unwrap();

    // A platform constraint asks whether the node runs that platform: without a
    // variant any amd64 level does, v1 is run by every level, and arm64 by none.
    let level = level.unwrap();
    let cases = [
        ("linux/amd64", true),
        ("linux/amd64/v1", true),
        (info.platform.as_str(), true),
        ("linux/arm64", false),
        ("darwin/amd64", false),
    ];
    for (i, (value, runs)) in cases.iter().enumerate() {
        let name = format!("platform-{i}");
        api.apply_yaml(&format!(
            "name: {name}\nkind: service\nruntime: mock\nconstraints: [{{ key: platform, value: {value} }}]\n"
        ))
        .await
        .unwrap();
        let (job, _) = api
            .wait_job(&name, T, |j, t| {
                t.iter().any(|t| t.task.state == TaskState::Running) || j.pending_reason.is_some()
            })
            .await
            .unwrap();
        assert_eq!(
            job.pending_reason.is_none(),
            *runs,
            "{value} on a v{level} node: {:?}",
            job.pending_reason
        );
    }
    if level < 4 {
        let above = format!("linux/amd64/v{}", level + 1);
        api.apply_yaml(&format!(
            "name: above\nkind: service\nruntime: mock\nconstraints: [{{ key: platform, value: {above} }}]\n"
        ))
        .await
        .unwrap();
        let (job, _) = api
            .wait_job("above", T, |j, _| j.pending_reason.is_some())
            .await
            .unwrap();
        assert!(
            job.pending_reason
                .unwrap()
                .contains("fails the constraints")
        );
    }
}

//! `drover pipeline ...`: apply, list, inspect, pause, resume and delete pipelines, and
//! send messages to an http source.

use crate::client::Client;
use crate::outln;
use crate::output::{self, Output};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use drover_core::pipeline::{
    HttpMessage, HttpMessages, PipelineSpec, PipelineSummary, PipelineView, Rates,
};
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum PipelineCmd {
    /// Submit a pipeline from a YAML file (a new version when the spec changed).
    #[command(after_help = "Examples:\n  drover pipeline apply -f etl.yaml\n  \
        drover pipeline apply -f - < etl.yaml")]
    Apply {
        /// The pipeline's YAML spec; `-` reads it from standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List pipelines with their phase and running replicas.
    #[command(after_help = "Examples:\n  drover pipeline ls\n  drover pipeline ls -o json")]
    Ls,
    /// Show a pipeline: its phase and why, and per vertex its desired phase,
    /// replicas, rates and buffers.
    #[command(after_help = "Examples:\n  drover pipeline status etl\n  \
        drover pipeline status etl -o json")]
    Status {
        /// The pipeline's name.
        name: String,
    },
    /// Pause a pipeline: its sources stop, what is in flight drains (up to the spec's
    /// pause_grace), then every vertex stops.
    #[command(after_help = "Examples:\n  drover pipeline pause etl")]
    Pause {
        /// The pipeline's name.
        name: String,
    },
    /// Resume a paused pipeline with the replicas it had before the pause.
    #[command(after_help = "Examples:\n  drover pipeline resume etl\n  \
        drover pipeline resume etl --slow   (each vertex at its scale.min)")]
    Resume {
        /// The pipeline's name.
        name: String,
        /// Start each vertex at its scale.min rather than its replicas from before.
        #[arg(long)]
        slow: bool,
    },
    /// Delete a pipeline: its vertices stop, then their jobs, buffers and the
    /// pipeline are removed.
    #[command(alias = "rm", after_help = "Examples:\n  drover pipeline delete etl")]
    Delete {
        /// The pipeline's name.
        name: String,
    },
    /// Send messages to a pipeline's http source: one per DATA argument, or one per
    /// line of standard input with `-`.
    #[command(
        after_help = "Examples:\n  drover pipeline send web in hello world\n  \
        drover pipeline send web in --key user-7 '{\"clicks\": 3}'\n  \
        seq 100 | drover pipeline send web in -"
    )]
    Send {
        /// The pipeline's name.
        name: String,
        /// The http source vertex.
        vertex: String,
        /// The key of every message (it chooses the partition).
        #[arg(long, default_value = "")]
        key: String,
        /// The messages; `-` reads one per line from standard input.
        #[arg(value_name = "DATA", required = true)]
        data: Vec<String>,
    },
}

pub(crate) async fn run(c: &Client, out: Output, cmd: &PipelineCmd) -> Result<i32> {
    match cmd {
        PipelineCmd::Apply { file } => {
            let (name, text, base) = crate::read_spec_file(file)?;
            // Checked here, with the file's line and column, before anything is sent.
            let mut spec = PipelineSpec::from_yaml(&text, &name)?;
            // A vertex's local working_dir is packed and uploaded as a job's is, and its
            // digest sent in its place.
            for v in &mut spec.vertices {
                if let Some(run) = v.role.run_mut() {
                    crate::resolve_working_dir(c, &mut run.runtime_env, &base, true)
                        .await
                        .with_context(|| format!("vertex {}", v.name))?;
                }
            }
            let res = c.apply_pipeline(&spec).await?;
            match out {
                Output::Json => output::json(&res)?,
                Output::Table => outln!(
                    "pipeline {} {} (version {})",
                    res.pipeline.name,
                    res.result,
                    res.pipeline.version
                )?,
            }
            Ok(0)
        }
        PipelineCmd::Ls => {
            let list = c.pipelines().await?;
            ls(out, &list)?;
            Ok(0)
        }
        PipelineCmd::Status { name } => {
            status(out, &c.pipeline(name).await?)?;
            Ok(0)
        }
        PipelineCmd::Pause { name } => acted(out, &c.pipeline_action(name, "pause").await?),
        PipelineCmd::Resume { name, slow } => {
            let action = if *slow { "resume?slow=true" } else { "resume" };
            acted(out, &c.pipeline_action(name, action).await?)
        }
        PipelineCmd::Delete { name } => acted(out, &c.delete_pipeline(name).await?),
        PipelineCmd::Send {
            name,
            vertex,
            key,
            data,
        } => {
            let mut lines = Vec::new();
            for d in data {
                if d == "-" {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                    lines.extend(text.lines().map(str::to_string));
                } else {
                    lines.push(d.clone());
                }
            }
            if lines.is_empty() {
                bail!("no messages to send: standard input was empty");
            }
            let mut ids = Vec::new();
            // Sent in batches the controller takes in one request each.
            for chunk in lines.chunks(drover_core::pipeline::object::MAX_HTTP_MESSAGES) {
                let messages = HttpMessages {
                    messages: chunk
                        .iter()
                        .map(|d| HttpMessage {
                            key: key.clone(),
                            data: d.clone(),
                        })
                        .collect(),
                };
                ids.extend(c.send_messages(name, vertex, &messages).await?.ids);
            }
            match out {
                Output::Json => output::json(&serde_json::json!({ "ids": ids }))?,
                Output::Table => eprintln!("sent {} message(s) to {name}/{vertex}", ids.len()),
            }
            Ok(0)
        }
    }
}

/// What a pause, resume or delete leaves the pipeline as.
fn acted(out: Output, p: &PipelineSummary) -> Result<i32> {
    match out {
        Output::Json => output::json(p)?,
        Output::Table => eprintln!(
            "pipeline {}: asked; now {} ({}); `drover pipeline status {}` follows it",
            p.name,
            serde_plain(&p.phase),
            p.reason,
            p.name
        ),
    }
    Ok(0)
}

/// A unit enum value as its JSON string, without quotes.
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn ls(out: Output, list: &[PipelineSummary]) -> Result<()> {
    if out == Output::Json {
        return output::json(&list);
    }
    let projects = list
        .iter()
        .map(|p| &p.project)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    let mut headers = vec!["NAME", "PHASE", "VERTICES", "RUNNING", "VERSION", "AGE"];
    if projects {
        headers.insert(0, "PROJECT");
    }
    let mut t = output::table(&headers);
    for p in list {
        let mut row = vec![
            p.name.clone(),
            serde_plain(&p.phase),
            p.vertices.to_string(),
            p.running.to_string(),
            p.version.to_string(),
            output::age(p.created_at),
        ];
        if projects {
            row.insert(0, p.project.to_string());
        }
        t.add_row(row);
    }
    output::print(t)
}

fn rates(r: &Rates) -> String {
    let one = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    format!("{}/{}/{}", one(r.m1), one(r.m5), one(r.m15))
}

fn status(out: Output, v: &PipelineView) -> Result<()> {
    if out == Output::Json {
        return output::json(v);
    }
    let p = &v.pipeline;
    outln!(
        "pipeline: {} (version {}, project {})",
        p.name,
        p.version,
        p.project
    )?;
    outln!("phase:    {}", serde_plain(&p.status.phase))?;
    outln!("reason:   {}", p.status.reason)?;
    if p.status.pause_started_at.is_some() {
        outln!("drained on pause: {}", p.status.drained_on_pause)?;
    }
    outln!()?;
    let mut t = output::table(&[
        "VERTEX",
        "KIND",
        "PHASE",
        "REPLICAS",
        "IN/S 1/5/15M",
        "OUT/S 1/5/15M",
    ]);
    for x in &v.vertices {
        t.add_row(vec![
            x.name.clone(),
            x.kind.clone(),
            x.desired_phase.to_string(),
            format!("{}/{}", x.running_replicas, x.desired_replicas),
            rates(&x.rate_in),
            rates(&x.rate_out),
        ]);
    }
    output::print(t)?;
    // Per vertex, the autoscaler's last change and, when it says something else, what
    // it decided on its latest round (a hold and why).
    let scaled: Vec<_> = v
        .vertices
        .iter()
        .filter(|x| x.last_scale.is_some() || x.scale_decision.is_some())
        .collect();
    if !scaled.is_empty() {
        outln!()?;
        for x in scaled {
            if let Some(s) = &x.last_scale {
                outln!("{}: {} ({} ago)", x.name, s.reason, output::age(s.at))?;
            }
            let changed = x.last_scale.as_ref().map(|s| s.reason.as_str());
            if let Some(now) = x.scale_decision.as_deref().filter(|d| Some(*d) != changed) {
                outln!("{}: now {now}", x.name)?;
            }
        }
    }
    outln!()?;
    let mut t = output::table(&["BUFFER", "PENDING", "UNACKED", "USAGE"]);
    for x in &v.vertices {
        for b in &x.buffers {
            let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
            let usage = match (&b.error, b.usage) {
                (Some(e), _) => format!("unreadable: {e}"),
                (None, Some(u)) => format!("{:.1}%", u * 100.0),
                (None, None) => "?".to_string(),
            };
            t.add_row(vec![b.name.clone(), n(b.pending), n(b.unacked), usage]);
        }
    }
    output::print(t)
}

//! Which global flags each command reads.
//!
//! The connection flags (`--server`, `--token`, ...) and `-o` are declared once, on the
//! root command, and clap copies them onto every subcommand. Most commands read them,
//! but `drover up`, `drover server` and `drover completions` read none, and `drover
//! agent` only the ones that reach a controller. Offering `--token` in `drover up
//! --help` teaches something false, and accepting `drover up --token X` silently hides
//! a mistake, so this module hides from each command's help the globals it does not
//! read, and [`refused`] names one given on the command line anyway.
//!
//! The one table, [`reads`], also decides which commands refuse `-o json`.

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Every global flag, by its clap id (the field name in `Cli`).
pub const ALL: &[&str] = &[
    "server",
    "ca",
    "server_fingerprint",
    "token",
    "project",
    "context",
    "output",
];

/// What a client command reads: where the server is, how to trust it, the token, the
/// project, the context they may come from, and the output format.
const CLIENT: &[&str] = ALL;
/// `drover run`: a client command without JSON output (its output is the task's).
const RUN: &[&str] = &[
    "server",
    "ca",
    "server_fingerprint",
    "token",
    "project",
    "context",
];
/// `drover version`: the server's version needs no project.
const VERSION: &[&str] = &[
    "server",
    "ca",
    "server_fingerprint",
    "token",
    "context",
    "output",
];
/// `drover agent` dials a controller, which it must trust, with a join token of its own.
const AGENT: &[&str] = &["server", "ca", "server_fingerprint"];
/// `drover context ls` reads the config file itself and lists it.
const OUTPUT_ONLY: &[&str] = &["output"];
/// Commands that reach no server and print no listing.
const NOTHING: &[&str] = &[];

/// The global flags the command at `path` (its names below the root, e.g. `["job",
/// "ls"]`) reads. A command group reads what any of its commands reads, so that its
/// help still shows the flags they share.
pub fn reads(path: &[&str]) -> &'static [&'static str] {
    match path {
        ["run", ..] => RUN,
        ["up" | "server" | "completions", ..] => NOTHING,
        ["agent", ..] => AGENT,
        ["version", ..] => VERSION,
        ["context", "ls", ..] => OUTPUT_ONLY,
        ["context", "use" | "rm" | "rename", ..] => NOTHING,
        ["context"] => OUTPUT_ONLY,
        // Pipelines are a client's, with a JSON form of every answer.
        ["pipeline", ..] => CLIENT,
        // Every other command talks to the server and prints a listing or an answer
        // that has a JSON form.
        _ => CLIENT,
    }
}

/// The root command, with each subcommand's help showing only the globals it reads.
pub fn command<C: clap::CommandFactory>() -> Command {
    let mut root = C::command();
    let globals: Vec<clap::Arg> = root
        .get_arguments()
        .filter(|a| ALL.contains(&a.get_id().as_str()))
        .cloned()
        .collect();
    for sub in root.get_subcommands_mut() {
        hide_unread(sub, &globals, &mut Vec::new());
    }
    root
}

/// Gives `cmd`, and its subcommands, a hidden copy of each global it does not read.
/// When clap builds the command it copies a global onto a subcommand only where the
/// subcommand has no argument of that id, so the hidden copy is the one used there,
/// and, being global too, its value still reaches `Cli`. (Hiding the copies clap makes
/// is not possible: changing an argument of a built command leaves clap's index of
/// flag names pointing at the wrong arguments.)
fn hide_unread(cmd: &mut Command, globals: &[clap::Arg], parents: &mut Vec<String>) {
    parents.push(cmd.get_name().to_string());
    let path: Vec<&str> = parents.iter().map(String::as_str).collect();
    let read = reads(&path);
    let mut here = std::mem::take(cmd);
    for arg in globals {
        if !read.contains(&arg.get_id().as_str()) {
            here = here.arg(arg.clone().hide(true));
        }
    }
    *cmd = here;
    for sub in cmd.get_subcommands_mut() {
        hide_unread(sub, globals, parents);
    }
    parents.pop();
}

/// The names of the subcommands `matches` chose, from the root down.
pub fn path(matches: &ArgMatches) -> Vec<String> {
    let mut path = Vec::new();
    let mut here = matches;
    while let Some((name, sub)) = here.subcommand() {
        path.push(name.to_string());
        here = sub;
    }
    path
}

/// The first global flag given on the command line that the chosen command does not
/// read, as the user would type it (`--token`), with the command's name. A value that
/// came from the environment (DROVER_SERVER set for a whole shell) is not refused.
pub fn refused(matches: &ArgMatches) -> Option<(String, String)> {
    let path = path(matches);
    let names: Vec<&str> = path.iter().map(String::as_str).collect();
    let read = reads(&names);
    let mut leaf = matches;
    while let Some((_, sub)) = leaf.subcommand() {
        leaf = sub;
    }
    let given = |id: &str| {
        leaf.try_contains_id(id).unwrap_or(false)
            && leaf.value_source(id) == Some(ValueSource::CommandLine)
    };
    ALL.iter()
        .find(|id| !read.contains(id) && given(id))
        .map(|id| (flag(id), names.join(" ")))
}

/// A global's flag as typed: `server_fingerprint` is `--server-fingerprint`, and the
/// output format is `-o`.
fn flag(id: &str) -> String {
    match id {
        "output" => "-o/--output".to_string(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_reads_what_its_commands_read() {
        assert_eq!(reads(&["job"]), CLIENT);
        assert_eq!(reads(&["context"]), OUTPUT_ONLY);
        assert_eq!(reads(&["context", "use"]), NOTHING);
        assert_eq!(reads(&["agent"]), AGENT);
    }

    #[test]
    fn flags_read_as_typed() {
        assert_eq!(flag("server_fingerprint"), "--server-fingerprint");
        assert_eq!(flag("output"), "-o/--output");
        assert_eq!(flag("token"), "--token");
    }
}

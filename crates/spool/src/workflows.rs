//! `spool workflows` and `spool workflow ID`: clients of `/v1/workflows`
//! (API.md, "Workflows"). A workflow prints as a tree of its steps, each
//! with its state, its job's attempts and error, and its compensation.

use anyhow::Context;
use hyper::Method;
use serde_json::Value;

use crate::admin::{num, render_table, Align};
use crate::client::{escape, Client, ServerArgs};

#[derive(Debug, clap::Args)]
pub struct WorkflowsArgs {
    #[command(flatten)]
    server: ServerArgs,

    /// Print the server's JSON instead of a table.
    #[arg(long)]
    json: bool,

    /// Only workflows in this state: running, succeeded, compensating,
    /// compensated, compensation_failed.
    #[arg(long)]
    state: Option<String>,

    /// At most this many workflows [default: the server's]
    #[arg(long)]
    limit: Option<u32>,

    /// Only workflows with a higher id (the `next` of the previous page).
    #[arg(long)]
    after: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct WorkflowArgs {
    #[command(flatten)]
    server: ServerArgs,

    /// Print the server's JSON instead of the tree.
    #[arg(long)]
    json: bool,

    /// Cancel the workflow first: no new step starts, running ones are
    /// cancelled, completed ones compensated.
    #[arg(long)]
    cancel: bool,

    /// The workflow id.
    id: u64,
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `spool workflows`.
pub fn list(args: WorkflowsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server)?;
    let mut query = Vec::new();
    if let Some(state) = &args.state {
        query.push(format!("state={}", escape(state)));
    }
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    if let Some(after) = args.after {
        query.push(format!("after={after}"));
    }
    let mut path = "/v1/workflows".to_string();
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let page = client.get(&path)?;
    if args.json {
        return print_json(&page);
    }
    let workflows = page
        .get("workflows")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let rows: Vec<Vec<String>> = workflows
        .iter()
        .map(|w| {
            let steps = w
                .get("steps")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            let done = steps
                .iter()
                .filter(|s| s.get("state").and_then(Value::as_str) == Some("completed"))
                .count();
            vec![
                num(w, "/id"),
                num(w, "/name"),
                num(w, "/state"),
                format!("{done}/{}", steps.len()),
                num(w, "/created_at"),
                num(w, "/error"),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(
            &[
                ("ID", Align::Right),
                ("NAME", Align::Left),
                ("STATE", Align::Left),
                ("DONE", Align::Right),
                ("CREATED", Align::Left),
                ("ERROR", Align::Left),
            ],
            &rows,
        )
    );
    if let Some(next) = page.get("next").and_then(Value::as_u64) {
        println!("more: --after {next}");
    }
    Ok(())
}

/// `spool workflow ID`.
pub fn show(args: WorkflowArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server)?;
    let workflow = if args.cancel {
        client.send(
            Method::POST,
            &format!("/v1/workflows/{}/cancel", args.id),
            None,
        )
    } else {
        client.get(&format!("/v1/workflows/{}", args.id))
    }
    .with_context(|| format!("workflow {}", args.id))?;
    if args.json {
        return print_json(&workflow);
    }
    print!("{}", render_tree(&workflow));
    Ok(())
}

fn name_of(step: &Value) -> String {
    step.get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn deps_of(step: &Value) -> Vec<String> {
    step.get("depends_on")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// One step's line: state, job, attempts, joins, error, compensation.
fn describe(s: &Value) -> String {
    let mut line = format!("{}  {}", name_of(s), num(s, "/state"));
    if let Some(job) = s.get("job").and_then(Value::as_u64) {
        let attempts = s.get("attempts").and_then(Value::as_u64).unwrap_or(0);
        line.push_str(&format!(
            "  job {job} ({}, {attempts} failed attempt{})",
            num(s, "/job_state"),
            if attempts == 1 { "" } else { "s" }
        ));
    }
    let deps = deps_of(s);
    if deps.len() > 1 {
        line.push_str(&format!("  after {}", deps.join(", ")));
    }
    if let Some(error) = s.get("last_error").and_then(Value::as_str) {
        line.push_str(&format!("  error: {error}"));
    }
    if let Some(job) = s.get("compensation_job").and_then(Value::as_u64) {
        line.push_str(&format!("  compensation: job {job}"));
    }
    line
}

/// Writes the steps whose first dependency is `parent` ("" for roots),
/// each followed by its own children.
fn walk(
    out: &mut String,
    steps: &[Value],
    parent_of: &[String],
    parent: &str,
    prefix: &str,
    depth: usize,
) {
    // Names are unique, so the walk meets each step once; the bound on
    // the depth holds even for a server that sent a cycle.
    if depth > steps.len() {
        return;
    }
    let mine: Vec<usize> = (0..steps.len())
        .filter(|&i| parent_of[i] == parent)
        .collect();
    for (k, &i) in mine.iter().enumerate() {
        let last = k + 1 == mine.len();
        let branch = if last { "└─ " } else { "├─ " };
        out.push_str(&format!("{prefix}{branch}{}\n", describe(&steps[i])));
        let deeper = format!("{prefix}{}", if last { "   " } else { "│  " });
        walk(
            out,
            steps,
            parent_of,
            &name_of(&steps[i]),
            &deeper,
            depth + 1,
        );
    }
}

/// The workflow as a tree: each step under the first step it depends on
/// (so each appears once; a join names its other dependencies), roots in
/// the order given.
pub fn render_tree(workflow: &Value) -> String {
    let steps = workflow
        .get("steps")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let mut out = format!("workflow {}", num(workflow, "/id"));
    if let Some(name) = workflow.get("name").and_then(Value::as_str) {
        out.push_str(&format!(" {name:?}"));
    }
    out.push_str(&format!(": {}", num(workflow, "/state")));
    if workflow.get("cancel_requested") == Some(&Value::Bool(true)) {
        out.push_str(" (cancel requested)");
    }
    out.push('\n');
    if let Some(error) = workflow.get("error").and_then(Value::as_str) {
        out.push_str(&format!("  why: {error}\n"));
    }
    let parent_of: Vec<String> = steps
        .iter()
        .map(|s| deps_of(s).into_iter().next().unwrap_or_default())
        .collect();
    walk(&mut out, steps, &parent_of, "", "", 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dag_prints_as_a_tree_with_each_step_once() {
        let workflow = serde_json::json!({
            "id": 3, "name": "order-42", "state": "compensating",
            "error": "step ship buried: no courier", "cancel_requested": false,
            "steps": [
                {"name": "stock", "state": "compensated", "depends_on": [], "job": 1,
                 "job_state": "completed", "attempts": 0, "has_compensation": true, "compensation_job": 5},
                {"name": "coupon", "state": "compensating", "depends_on": ["stock"], "job": 2,
                 "job_state": "completed", "attempts": 1, "has_compensation": true, "compensation_job": 4},
                {"name": "label", "state": "completed", "depends_on": ["stock"], "job": 6,
                 "job_state": "completed", "attempts": 0, "has_compensation": false},
                {"name": "ship", "state": "failed", "depends_on": ["coupon", "label"], "job": 3,
                 "job_state": "buried", "attempts": 2, "last_error": "no courier", "has_compensation": false}
            ]
        });
        let text = render_tree(&workflow);
        let expected = "\
workflow 3 \"order-42\": compensating
  why: step ship buried: no courier
└─ stock  compensated  job 1 (completed, 0 failed attempts)  compensation: job 5
   ├─ coupon  compensating  job 2 (completed, 1 failed attempt)  compensation: job 4
   │  └─ ship  failed  job 3 (buried, 2 failed attempts)  after coupon, label  error: no courier
   └─ label  completed  job 6 (completed, 0 failed attempts)
";
        assert_eq!(text, expected);
    }
}

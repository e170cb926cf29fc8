//! What `burnrun check` prints: the resolved settings, the batch arithmetic and the rank mesh.
//!
//! Every line that is not a setting starts with `#`, so the report is itself a valid config:
//! `burnrun check run.toml > resolved.toml` gives a file that loads to the same settings.

use std::fmt::{self, Write as _};

use super::error::{ConfigError, Origin};
use super::schema::{find_table, join, tables};
use super::validate::Resolved;
use super::{DataKind, MeshCoords, Partition, RunConfig};

/// Ranks listed one per line in the mesh table; larger worlds are summarized after these.
const MESH_ROWS_SHOWN: usize = 64;

/// Validates `config` for `world_size` ranks and returns the report `burnrun check` prints.
pub fn check_report(config: &RunConfig, world_size: usize) -> Result<String, ConfigError> {
    Ok(config.validate(world_size)?.report())
}

/// What a user's task tells the report (`burnrun train` reports its built-in model and data from
/// the config itself).
#[derive(Debug, Clone)]
pub struct TaskFacts {
    /// The task's one-line description.
    pub describe: String,
    /// Its number of training samples.
    pub samples: usize,
}

impl Resolved {
    /// The full report of a `burnrun train` run: header, settings as TOML, batch arithmetic,
    /// mesh, notes.
    pub fn report(&self) -> String {
        self.report_for(None)
    }

    /// The report of a run of a user's task: `[model]` and `[data]` (the built-in's) left out,
    /// `[user]` shown, the epoch counted in the task's samples.
    pub fn task_report(&self, task: &TaskFacts) -> String {
        self.report_for(Some(task))
    }

    fn report_for(&self, task: Option<&TaskFacts>) -> String {
        let mut out = String::new();
        let source = self.config.source();
        let name = if source.name.is_empty() {
            "(built in code)"
        } else {
            source.name.as_str()
        };
        out.push_str(&format!("# config: {name}\n"));
        out.push_str(&format!(
            "# hash: {:016x} (every rank and node must agree)\n",
            self.config.hash()
        ));
        out.push_str(&format!("# world size: {}\n", self.world_size));
        if let Some(task) = task {
            out.push_str(&format!("# task: {}\n", task.describe));
        }
        out.push_str(&self.settings_toml_for(task.is_some()));
        out.push_str("\n# batch\n");
        for line in self.batch_arithmetic_for(task.map(|t| t.samples)) {
            out.push_str(&format!("#   {line}\n"));
        }
        out.push_str("\n# rank mesh\n");
        for line in self.mesh_table() {
            out.push_str(&format!("#   {line}\n"));
        }
        if !self.notes.is_empty() {
            out.push_str("\n# notes\n");
            for note in &self.notes {
                out.push_str(&format!("#   - {note}\n"));
            }
        }
        out
    }

    /// Every section with defaults filled in, as TOML. Only the sub-tables of the selected
    /// `model.kind` and `data.kind` are shown; optional keys that are not set appear as comments,
    /// and overridden keys carry their `--set` as a comment.
    pub fn settings_toml(&self) -> String {
        self.settings_toml_for(false)
    }

    /// [`Self::settings_toml`]; for a user's task (`task`), without the built-in `[model]` and
    /// `[data]` and with `[user]`.
    fn settings_toml_for(&self, task: bool) -> String {
        let config = &self.config;
        let value = toml::Value::try_from(config).unwrap_or(toml::Value::Table(toml::Table::new()));
        let selected_model = format!("model.{}", config.model.kind);
        let selected_data = format!("data.{}", config.data.kind);
        let mut out = String::new();
        for table in tables() {
            let is_other_kind = |prefix: &str, selected: &str| table.path.starts_with(prefix) && table.path != selected;
            let builtin = ["model", "data"]
                .iter()
                .any(|t| table.path == *t || table.path.starts_with(&format!("{t}.")));
            if table.path.is_empty()
                || (task && builtin)
                || is_other_kind("model.", &selected_model)
                || is_other_kind("data.", &selected_data)
            {
                continue;
            }
            let _ = writeln!(out, "\n[{}]", table.path);
            for key in table.keys {
                let path = join(table.path, key);
                if find_table(&path).is_some() {
                    continue;
                }
                match lookup(&value, &path) {
                    Some(setting) => {
                        let _ = write!(out, "{key} = {setting}");
                        if let Some(Origin::Override(set)) = config.source().origins.get(&path) {
                            let _ = write!(out, "  # --set {set}");
                        }
                        out.push('\n');
                    }
                    None => {
                        let _ = writeln!(out, "# {key}: not set{}", unset_meaning(self, &path));
                    }
                }
            }
        }
        if task {
            // The program's own section, as written (its keys are checked by the program).
            let user = toml::to_string(&config.user).unwrap_or_default();
            let _ = write!(out, "\n[user]\n{user}");
        }
        out
    }

    /// The batch sizes derived from the config, every term named, e.g.
    /// `global batch = batch_size(32) x grad_accum_steps(2) x data-parallel ranks(2) = 128`.
    pub fn batch_arithmetic(&self) -> Vec<String> {
        let samples = (self.config.data.kind == DataKind::Synthetic).then_some(self.config.data.synthetic.samples);
        self.batch_arithmetic_for(samples)
    }

    /// [`Self::batch_arithmetic`] with the epoch counted in `samples` when known.
    fn batch_arithmetic_for(&self, samples: Option<usize>) -> Vec<String> {
        let train = &self.config.train;
        let parallel = &self.config.parallel;
        let data_ranks = self.mesh.data;
        let mut lines = Vec::new();
        if self.mesh.pipeline > 1 {
            lines.push(format!(
                "micro-batch = batch_size({}) / micro_batches({}) = {} samples per pipeline micro-batch",
                train.batch_size, parallel.micro_batches, self.micro_batch_size
            ));
        }
        lines.push(format!(
            "global batch = batch_size({}) x grad_accum_steps({}) x data-parallel ranks({data_ranks}) = {}",
            train.batch_size, train.grad_accum_steps, self.global_batch
        ));
        if let Some(seq_len) = self.seq_len {
            lines.push(format!(
                "tokens per step = global batch({}) x seq_len({seq_len}) = {}",
                self.global_batch,
                self.global_batch * seq_len
            ));
        }
        if let Some(samples) = samples {
            let per_micro_step = train.batch_size * data_ranks;
            let micro_steps = samples / per_micro_step.max(1);
            let remainder = samples % per_micro_step.max(1);
            let rule = if remainder == 0 {
                "no uneven last batch".to_string()
            } else if self.config.data.drop_last {
                format!("the last {remainder} samples of each epoch's order are dropped (drop_last = true)")
            } else {
                format!(
                    "the last batch wraps around to fill {} samples (drop_last = false)",
                    per_micro_step - remainder
                )
            };
            lines.push(format!(
                "epoch = samples({samples}) / (batch_size({}) x data-parallel ranks({data_ranks})) = {micro_steps} \
                 micro steps; {rule}",
                train.batch_size
            ));
        }
        lines.push(format!(
            "samples seen = global batch({}) x steps({}) = {}",
            self.global_batch,
            train.steps,
            self.global_batch as u64 * train.steps
        ));
        lines
    }

    /// The rank mesh: a header with the axis sizes, then each rank's `(data, tensor, stage)`
    /// coordinates and the members of its data-parallel, tensor-parallel and pipeline groups (the
    /// process groups the trainer makes with `split`), then the stage split.
    pub fn mesh_table(&self) -> Vec<String> {
        let mesh = self.mesh;
        let mut lines = vec![
            format!(
                "data({}) x tensor({}) x pipeline({}) = WORLD_SIZE({})",
                mesh.data, mesh.tensor, mesh.pipeline, self.world_size
            ),
            "rank  (data, tensor, stage)  data-parallel group  tensor-parallel group  pipeline group".to_string(),
        ];
        for rank in 0..mesh.world_size().min(MESH_ROWS_SHOWN) {
            let MeshCoords { data, tensor, stage } = mesh.coords(rank);
            let coords = format!("({data}, {tensor}, {stage})");
            let data_group = format!("{:?}", mesh.data_group(stage, tensor));
            let tensor_group = format!("{:?}", mesh.tensor_group(data, stage));
            lines.push(format!(
                "{rank:>4}  {coords:<21}  {data_group:<19}  {tensor_group:<21}  {:?}",
                mesh.pipeline_group(data, tensor)
            ));
        }
        if mesh.world_size() > MESH_ROWS_SHOWN {
            lines.push(format!(
                "... {} more ranks: rank r is tensor rank r % {t} of stage (r / {t}) % {p} of replica r / {}",
                mesh.world_size() - MESH_ROWS_SHOWN,
                mesh.tensor * mesh.pipeline,
                t = mesh.tensor,
                p = mesh.pipeline,
            ));
        }
        if mesh.pipeline > 1 {
            lines.push(self.stage_split());
        }
        lines
    }

    fn stage_split(&self) -> String {
        let blocks = self.config.model.num_blocks();
        let kind = self.config.model.kind;
        match &self.config.parallel.partition {
            Partition::Balanced => format!(
                "stages: {blocks} blocks of model \"{kind}\" split over {} stages by parameter count \
                 (the split is printed at start)",
                self.mesh.pipeline
            ),
            Partition::Boundaries(boundaries) => {
                let mut starts = vec![0];
                starts.extend(boundaries);
                starts.push(blocks);
                let stages: Vec<String> = starts
                    .windows(2)
                    .enumerate()
                    .map(|(stage, range)| format!("stage {stage}: blocks {}..{}", range[0], range[1]))
                    .collect();
                format!("stages: {}", stages.join(", "))
            }
        }
    }
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report())
    }
}

/// The value at dotted `path` inside `value`.
fn lookup<'v>(value: &'v toml::Value, path: &str) -> Option<&'v toml::Value> {
    path.split('.').try_fold(value, |value, key| value.get(key))
}

/// What an unset optional key means, for the report's comment.
fn unset_meaning(resolved: &Resolved, path: &str) -> String {
    match (path, resolved.seq_len) {
        ("data.text.seq_len", Some(seq_len)) => format!(", so model.gpt.block_size ({seq_len})"),
        ("checkpoint.path", _) => format!(", so the newest under {}/checkpoints/", resolved.config.train.out_dir),
        ("comm.ring_threshold_bytes" | "comm.segment_bytes" | "comm.shm" | "comm.shm_ring_bytes", _) => {
            ", so the engine's default".to_string()
        }
        ("comm.hierarchical", _) => ", so BURNRUN_HIERARCHICAL, else \"auto\"".to_string(),
        _ => String::new(),
    }
}

//! The TOML run config: loading, errors with file/key/line, `--set` overrides, validation against
//! the world size, and the `burnrun check` report.

use std::path::{Path, PathBuf};

use burnrun::config::{
    check_report, CommBackend, ConfigError, DeviceSpec, HierarchicalMode, Origin, Partition, PipelineSchedule,
    RunConfig, DEFAULT_CONFIG, DEFAULT_CONFIG_NAME,
};

fn sets(overrides: &[&str]) -> Vec<String> {
    overrides.iter().map(|s| s.to_string()).collect()
}

fn parse(text: &str) -> Result<RunConfig, ConfigError> {
    RunConfig::from_str_named(text, "configs/x.toml", &[])
}

fn parse_with(text: &str, overrides: &[&str]) -> Result<RunConfig, ConfigError> {
    RunConfig::from_str_named(text, "configs/x.toml", &sets(overrides))
}

fn example_configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("configs/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

/// Runs `f` with the crate root as the current directory, so relative data paths resolve.
fn in_crate_root<T>(f: impl FnOnce() -> T) -> T {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).expect("crate root exists");
    f()
}

#[test]
fn an_empty_file_gives_the_documented_defaults() {
    let config = parse("").unwrap();
    let mut expected = RunConfig::default();
    expected.train.out_dir = "runs/x".to_string();
    assert_eq!(config, expected);
    assert_eq!(config.model.mlp.hidden, vec![1024, 1024]);
    assert_eq!(config.comm.bucket_cap_mb, 25.0);
    assert_eq!(config.parallel.partition, Partition::Balanced);
    assert_eq!(config.precision.loss_scale_init, 65536.0);
    assert!(config.data.drop_last);
}

#[test]
fn the_embedded_default_is_the_mlp_synthetic_file_and_validates_on_two_ranks() {
    let on_disk = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_NAME)).unwrap();
    assert_eq!(DEFAULT_CONFIG, on_disk);
    let config = RunConfig::embedded_default(&[]).unwrap();
    assert_eq!(config.train.out_dir, "runs/mlp_synthetic");
    let resolved = config.validate(2).unwrap();
    assert_eq!(resolved.mesh.data, 2);
    assert_eq!(resolved.global_batch, 64);
}

#[test]
fn every_example_config_loads_validates_and_round_trips() {
    let files = example_configs();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "mlp_synthetic.toml",
        "cnn_synthetic.toml",
        "gpt_text.toml",
        "mlp_pipeline.toml",
        "mlp_bench.toml",
    ] {
        assert!(names.iter().any(|n| n == expected), "configs/{expected} is missing");
    }
    in_crate_root(|| {
        for path in &files {
            let config = RunConfig::load(path, &[]).unwrap_or_else(|e| panic!("{e}"));
            let pipeline = config.parallel.pipeline;
            for world_size in [pipeline, 2 * pipeline] {
                let resolved = config
                    .validate(world_size)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(resolved.mesh.world_size(), world_size);
            }
            let again = RunConfig::from_str_named(&config.to_toml_string(), "again.toml", &[]).unwrap();
            assert_eq!(
                again,
                config,
                "{} does not round-trip through to_toml_string",
                path.display()
            );
            assert_eq!(again.hash(), config.hash());
        }
    });
}

#[test]
fn the_benchmark_config_is_issue_threes_mlp() {
    let config = RunConfig::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/mlp_bench.toml"),
        &[],
    )
    .unwrap();
    assert_eq!(config.model.mlp.hidden, vec![1024, 1024]);
    assert_eq!(config.data.synthetic.features, 784);
    assert_eq!(config.data.synthetic.classes, 10);
    assert_eq!(config.train.batch_size, 128);
    assert_eq!(config.train.threads, 1);
}

#[test]
fn an_unknown_key_is_refused_naming_the_key_the_line_and_the_keys_that_exist() {
    let text = "[train]\nsteps = 10\n\n[optim]\nkind = \"sgd\"\nlrr = 0.1\n";
    let err = parse(text).unwrap_err();
    assert_eq!(err.key(), Some("optim.lrr"));
    assert_eq!(err.line(), Some(6));
    let message = err.to_string();
    assert!(
        message.starts_with("configs/x.toml:6:1: unknown key `lrr` in [optim] (did you mean `lr`?"),
        "{message}"
    );
    assert!(message.contains("expected one of: kind, lr, momentum,"), "{message}");
}

#[test]
fn unknown_keys_are_found_in_sub_tables_dotted_keys_inline_tables_and_the_top_level() {
    let cases = [
        ("[model.gpt]\nn_layers = 2\n", "model.gpt.n_layers", 2),
        ("optim.lrr = 1\n", "optim.lrr", 1),
        (
            "\n\nmodel = { kind = \"mlp\", mlp = { hiden = [1] } }\n",
            "model.mlp.hiden",
            3,
        ),
        ("[optimizer]\nlr = 1\n", "optimizer", 1),
    ];
    for (text, key, line) in cases {
        let err = parse(text).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{text:?}: {err}");
        assert_eq!(err.key(), Some(key), "{text:?}: {err}");
        assert_eq!(err.line(), Some(line), "{text:?}: {err}");
    }
    let top = parse("[optimizer]\n").unwrap_err().to_string();
    assert!(
        top.contains("unknown key `optimizer` at the top level (did you mean `optim`?"),
        "{top}"
    );
}

#[test]
fn a_wrong_type_is_refused_naming_the_key_and_the_line() {
    let cases = [
        (
            "[optim]\nkind = \"adam\"\nlr = \"fast\"\n",
            "optim.lr",
            3,
            "expected f64",
        ),
        ("[optim]\nkind = \"sgdd\"\n", "optim.kind", 2, "unknown variant `sgdd`"),
        ("[train]\n\nsteps = -5\n", "train.steps", 3, "-5"),
        (
            "[model.mlp]\nhidden = [128, \"wide\"]\n",
            "model.mlp.hidden",
            2,
            "expected usize",
        ),
        (
            "[data.synthetic]\nimage_shape = [1, 28]\n",
            "data.synthetic.image_shape",
            2,
            "length 2",
        ),
        (
            "[parallel]\npartition = \"greedy\"\n",
            "parallel.partition",
            2,
            "\"balanced\" or an array",
        ),
        (
            "[log]\nprogress = \"fancy\"\n",
            "log.progress",
            2,
            "expected one of `auto`, `bar`, `plain`, `off`",
        ),
        ("optim = 3\n", "optim", 1, "invalid type"),
    ];
    for (text, key, line, needle) in cases {
        let err = parse(text).unwrap_err();
        assert!(matches!(err, ConfigError::Type { .. }), "{text:?}: {err}");
        assert_eq!(err.key(), Some(key), "{text:?}: {err}");
        assert_eq!(err.line(), Some(line), "{text:?}: {err}");
        let message = err.to_string();
        assert!(message.starts_with(&format!("configs/x.toml:{line}:")), "{message}");
        assert!(message.contains(needle), "{text:?}: {message}");
    }
}

#[test]
fn invalid_toml_is_refused_with_its_line() {
    let err = parse("[train]\nsteps = 10\nbatch_size = = 3\n").unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert_eq!(err.line(), Some(3));
}

#[test]
fn a_missing_file_is_refused_naming_it() {
    let err = RunConfig::load("configs/does_not_exist.toml", &[]).unwrap_err();
    assert!(err.to_string().contains("configs/does_not_exist.toml"), "{err}");
}

#[test]
fn data_times_pipeline_not_equal_to_the_world_size_names_every_term_and_the_line() {
    let text = "[model.mlp]\nhidden = [64, 64, 64]\n\n[parallel]\ndata = 2\npipeline = 3\n";
    let err = parse(text).unwrap().validate(4).unwrap_err();
    let message = err.to_string();
    assert_eq!(
        message,
        "configs/x.toml:5:1: parallel: data(2) * tensor(1) * pipeline(3) = 6 != WORLD_SIZE(4)"
    );
    assert_eq!(err.key(), Some("parallel.data"));
    assert_eq!(err.line(), Some(5));

    let auto = parse("[model.mlp]\nhidden = [64, 64, 64]\n[parallel]\npipeline = 3\n")
        .unwrap()
        .validate(4)
        .unwrap_err();
    assert!(
        auto.to_string()
            .contains("WORLD_SIZE(4) % (tensor(1) * pipeline(3)) = 1 != 0"),
        "{auto}"
    );
}

#[test]
fn every_failed_check_is_reported_at_once() {
    let text =
        "[train]\nbatch_size = 30\n[parallel]\nmicro_batches = 4\n[optim]\nlr = 0.0\n[comm]\nbackend = \"nccl\"\n";
    let message = parse(text).unwrap().validate(1).unwrap_err().to_string();
    for needle in [
        "3 problems in the config",
        "configs/x.toml:6:1: optim.lr = 0: must be a finite number > 0",
        "configs/x.toml:4:1: parallel: micro_batches(4) does not divide train.batch_size(30): 30 % 4 = 2",
        "comm.backend = \"nccl\" needs a GPU, but train.device = \"cpu\"",
    ] {
        assert!(message.contains(needle), "missing {needle:?} in:\n{message}");
    }
}

#[test]
fn impossible_combinations_are_refused_before_training() {
    in_crate_root(|| {
        let cases: [(&str, usize, &str); 9] = [
            (
                "[model]\nkind = \"gpt\"\n",
                1,
                "model.kind = \"gpt\" needs data.kind = \"text\"",
            ),
            ("[model]\nkind = \"cnn\"\n", 1, "model.kind = \"cnn\" needs images"),
            (
                "[data]\nkind = \"text\"\n[data.text]\npath = \"configs/data/lighthouse.txt\"\n",
                1,
                "needs model.kind = \"gpt\"",
            ),
            ("[data]\nkind = \"idx\"\n", 1, "data.idx.images is not set"),
            (
                "[model.gpt]\nn_embd = 64\nn_head = 5\n[model]\nkind = \"gpt\"\n",
                1,
                "n_embd(64) % n_head(5) = 4 != 0",
            ),
            (
                "[data.synthetic]\nsamples = 100\n",
                4,
                "samples(100) < train.batch_size(32) x data-parallel ranks(4) = 128",
            ),
            (
                "[checkpoint]\npath = \"runs/x/checkpoints/10\"\n",
                1,
                "set checkpoint.resume = true",
            ),
            (
                "[parallel]\npipeline = 2\npartition = [5]\n",
                2,
                "parallel.partition = [5]: needs pipeline(2) - 1 = 1",
            ),
            (
                "[parallel]\npipeline = 4\n",
                4,
                "parallel.pipeline(4) > blocks(3) of model \"mlp\"",
            ),
        ];
        for (text, world_size, needle) in cases {
            let err = parse(text).unwrap().validate(world_size).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: expected {needle:?} in {err}");
        }
    });
}

#[test]
fn a_set_of_an_unknown_key_is_refused_naming_the_override() {
    let err = parse_with("", &["optim.lrr=0.1"]).unwrap_err();
    assert!(matches!(err, ConfigError::Override { .. }), "{err}");
    assert_eq!(err.key(), Some("optim.lrr"));
    let message = err.to_string();
    assert!(
        message.starts_with("--set optim.lrr=0.1: unknown key `lrr` in [optim] (did you mean `lr`?"),
        "{message}"
    );

    let section = parse_with("", &["optimizer.lr=0.1"]).unwrap_err().to_string();
    assert!(
        section.contains("unknown key `optimizer` at the top level"),
        "{section}"
    );
    let table = parse_with("", &["optim=3"]).unwrap_err().to_string();
    assert!(table.contains("[optim] is a section, not a key"), "{table}");
    let too_deep = parse_with("", &["train.steps.max=3"]).unwrap_err().to_string();
    assert!(too_deep.contains("`train.steps` is a key, not a section"), "{too_deep}");
    let no_equals = parse_with("", &["train.steps"]).unwrap_err().to_string();
    assert!(no_equals.contains("expected section.key=value"), "{no_equals}");
}

#[test]
fn a_set_that_changes_a_keys_type_is_refused_naming_the_override() {
    let cases = [
        ("train.steps=abc", "invalid type: string \"abc\", expected u64"),
        ("train.steps=1.5", "invalid type: floating point `1.5`, expected u64"),
        ("optim.kind=sgdd", "unknown variant `sgdd`"),
        ("data.drop_last=yes", "expected a boolean"),
        ("model.mlp.hidden=64", "expected a sequence"),
    ];
    for (set, needle) in cases {
        let err = parse_with("", &[set]).unwrap_err();
        assert!(matches!(err, ConfigError::Override { .. }), "{set}: {err}");
        let message = err.to_string();
        assert!(message.starts_with(&format!("--set {set}: ")), "{message}");
        assert!(message.contains(needle), "{set}: {message}");
    }
}

#[test]
fn a_bare_string_and_a_quoted_string_set_the_same_value() {
    let bare = parse_with(
        "",
        &[
            "parallel.schedule=1f1b",
            "train.device=cuda:0",
            "train.out_dir=runs/a b",
        ],
    )
    .unwrap();
    let quoted = parse_with(
        "",
        &[
            "parallel.schedule=\"1f1b\"",
            "train.device='cuda:0'",
            "train.out_dir = \"runs/a b\"",
        ],
    )
    .unwrap();
    assert_eq!(bare, quoted);
    assert_eq!(bare.parallel.schedule, PipelineSchedule::OneFOneB);
    assert_eq!(bare.train.device, "cuda:0");
    assert_eq!(bare.train.out_dir, "runs/a b");
    // A bare scalar for a string key is the string (the key's type decides).
    assert_eq!(parse_with("", &["train.out_dir=2024"]).unwrap().train.out_dir, "2024");
}

#[test]
fn a_set_reaches_keys_left_at_their_default_including_unset_optional_ones() {
    let config = parse_with(
        "",
        &[
            "comm.segment_bytes=4096",
            "checkpoint.path=runs/x/checkpoints/00000010",
            "checkpoint.resume=true",
            "data.synthetic.image_shape=[1, 28, 28]",
            "parallel.partition=[2]",
            "optim.lr=1",
            "model.gpt.n_layer=6",
        ],
    )
    .unwrap();
    assert_eq!(config.comm.segment_bytes, Some(4096));
    assert_eq!(config.checkpoint.path.as_deref(), Some("runs/x/checkpoints/00000010"));
    assert_eq!(config.data.synthetic.image_shape, Some([1, 28, 28]));
    assert_eq!(config.parallel.partition, Partition::Boundaries(vec![2]));
    assert_eq!(config.optim.lr, 1.0);
    assert_eq!(config.model.gpt.n_layer, 6);
    assert_eq!(
        config.source().origins.get("optim.lr"),
        Some(&Origin::Override("optim.lr=1".to_string()))
    );
}

#[test]
fn every_key_of_the_schema_accepts_a_set_of_its_own_default() {
    let defaults = toml::Value::try_from(RunConfig::default()).unwrap();
    let mut leaves = Vec::new();
    collect_leaves(&defaults, "", &mut leaves);
    assert!(leaves.len() > 60, "only {} keys found", leaves.len());
    let defaults_loaded = parse("").unwrap();
    for (key, value) in leaves {
        let set = format!("{key}={value}");
        let config = parse_with("", &[&set]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config, defaults_loaded, "--set {set} changed the config");
    }
}

fn collect_leaves(value: &toml::Value, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, child) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                collect_leaves(child, &path, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

#[test]
fn a_later_set_wins_and_a_set_overrides_the_file() {
    let config = parse_with("[train]\nsteps = 10\n", &["train.steps=20", "train.steps=30"]).unwrap();
    assert_eq!(config.train.steps, 30);
}

#[test]
fn a_validation_error_from_an_override_names_the_override() {
    let err = parse_with("", &["parallel.data=3"])
        .unwrap()
        .validate(2)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "--set parallel.data=3: parallel: data(3) * tensor(1) * pipeline(1) = 3 != WORLD_SIZE(2)"
    );
}

#[test]
fn the_check_report_shows_the_batch_arithmetic_and_the_rank_mesh() {
    let config = parse_with("", &["train.grad_accum_steps=2"]).unwrap();
    let report = check_report(&config, 2).unwrap();
    assert!(
        report.contains("global batch = batch_size(32) x grad_accum_steps(2) x data-parallel ranks(2) = 128"),
        "{report}"
    );
    assert!(
        report.contains("data(2) x tensor(1) x pipeline(1) = WORLD_SIZE(2)"),
        "{report}"
    );
    assert!(
        report.contains("rank  (data, tensor, stage)  data-parallel group  tensor-parallel group  pipeline group"),
        "{report}"
    );
    assert!(
        report.contains("   0  (0, 0, 0)              [0, 1]               [0]                    [0]"),
        "{report}"
    );
    assert!(
        report.contains("   1  (1, 0, 0)              [0, 1]               [1]                    [1]"),
        "{report}"
    );
    assert!(
        report.contains("grad_accum_steps = 2  # --set train.grad_accum_steps=2"),
        "{report}"
    );
    assert!(report.contains(&format!("{:016x}", config.hash())), "{report}");
}

#[test]
fn the_check_report_of_a_pipeline_shows_each_ranks_coordinates_and_groups() {
    let text = "[model.mlp]\nhidden = [64, 64, 64]\n[parallel]\npipeline = 2\nmicro_batches = 4\npartition = [2]\n";
    let report = check_report(&parse(text).unwrap(), 4).unwrap();
    for needle in [
        "micro-batch = batch_size(32) / micro_batches(4) = 8",
        "global batch = batch_size(32) x grad_accum_steps(1) x data-parallel ranks(2) = 64",
        "data(2) x tensor(1) x pipeline(2) = WORLD_SIZE(4)",
        "   0  (0, 0, 0)              [0, 2]               [0]                    [0, 1]",
        "   1  (0, 0, 1)              [1, 3]               [1]                    [0, 1]",
        "   2  (1, 0, 0)              [0, 2]               [2]                    [2, 3]",
        "   3  (1, 0, 1)              [1, 3]               [3]                    [2, 3]",
        "stages: stage 0: blocks 0..2, stage 1: blocks 2..4",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in:\n{report}");
    }
}

#[test]
fn the_check_report_is_itself_a_config_with_the_same_settings() {
    in_crate_root(|| {
        for path in example_configs() {
            let config = RunConfig::load(&path, &[]).unwrap();
            let report = check_report(&config, config.parallel.pipeline).unwrap();
            let reloaded = RunConfig::from_str_named(&report, "report.toml", &[])
                .unwrap_or_else(|e| panic!("{}: {e}\n{report}", path.display()));
            assert_eq!(reloaded, config, "{}", path.display());
        }
    });
}

#[test]
fn keys_set_for_another_kind_are_noted_not_silently_ignored() {
    let text = "[model]\nkind = \"mlp\"\n[model.gpt]\nn_layer = 4\n[optim]\nkind = \"adam\"\nmomentum = 0.5\n";
    let resolved = parse(text).unwrap().validate(1).unwrap();
    let notes = resolved.notes.join("\n");
    assert!(
        notes.contains("model.gpt is set but model.kind = \"mlp\": it is ignored"),
        "{notes}"
    );
    assert!(
        notes.contains("optim.momentum is set but optim.kind = \"adam\": it is ignored"),
        "{notes}"
    );
}

#[test]
fn the_hash_follows_the_settings_and_not_their_spelling() {
    let a = parse("[optim]\nlr = 0.001\n").unwrap();
    let b = parse("optim.lr = 1e-3\n").unwrap();
    let c = parse("[optim]\nlr = 0.002\n").unwrap();
    assert_eq!(a.hash(), b.hash());
    assert_ne!(a.hash(), c.hash());
}

#[test]
fn the_resolved_mesh_is_the_one_the_parallel_layer_builds_with_the_documented_layout() {
    use burnrun::parallel::{MeshCoords, ParallelDims};
    for (data, pipeline) in [(1, 1), (2, 1), (1, 4), (2, 2), (3, 2), (2, 4)] {
        let world = data * pipeline;
        let shape = format!("{data} x {pipeline}");
        let explicit =
            format!("[model.mlp]\nhidden = [16, 16, 16, 16]\n[parallel]\ndata = {data}\npipeline = {pipeline}\n");
        let implied = format!("[model.mlp]\nhidden = [16, 16, 16, 16]\n[parallel]\ndata = 0\npipeline = {pipeline}\n");
        let mesh = parse(&explicit).unwrap().validate(world).unwrap().mesh;
        let dims = ParallelDims::new(data, 1, pipeline, world).unwrap();
        assert_eq!(mesh, dims, "{shape}");
        assert_eq!(
            mesh,
            ParallelDims {
                data,
                tensor: 1,
                pipeline
            },
            "{shape}"
        );
        assert_eq!(
            parse(&implied).unwrap().validate(world).unwrap().mesh,
            dims,
            "{shape}, data = 0"
        );
        assert_eq!(
            ParallelDims::new(0, 1, pipeline, world).unwrap(),
            dims,
            "{shape}, data = 0"
        );
        assert_eq!(mesh.world_size(), world);

        // Rank r is stage r % pipeline of replica r / pipeline.
        for rank in 0..world {
            let coords = mesh.coords(rank);
            let expected = MeshCoords {
                data: rank / pipeline,
                tensor: 0,
                stage: rank % pipeline,
            };
            assert_eq!(coords, expected, "rank {rank} of {shape}");
            assert_eq!(mesh.rank_of(coords), rank, "rank {rank} of {shape}");
            assert!(
                mesh.data_group(coords.stage, 0).contains(&rank),
                "rank {rank} of {shape}"
            );
            assert!(
                mesh.pipeline_group(coords.data, 0).contains(&rank),
                "rank {rank} of {shape}"
            );
        }
        // A stage's data-parallel group is every pipeline-th rank; a replica's stages are neighbours.
        for stage in 0..pipeline {
            let every_pipeline_th: Vec<usize> = (stage..world).step_by(pipeline).collect();
            assert_eq!(mesh.data_group(stage, 0), every_pipeline_th, "stage {stage} of {shape}");
        }
        for replica in 0..data {
            let neighbours: Vec<usize> = (replica * pipeline..(replica + 1) * pipeline).collect();
            assert_eq!(
                mesh.pipeline_group(replica, 0),
                neighbours,
                "replica {replica} of {shape}"
            );
        }
        let stages: Vec<usize> = (0..world).map(|r| r % pipeline).collect();
        let replicas: Vec<usize> = (0..world).map(|r| r / pipeline).collect();
        assert_eq!(mesh.data_colors(), stages, "{shape}");
        assert_eq!(mesh.pipeline_colors(), replicas, "{shape}");
    }
}

#[test]
fn shared_memory_settings_are_checked_with_their_line() {
    let ok = parse("[comm]\nshm = false\nshm_ring_bytes = 1048576\n").unwrap();
    assert_eq!(ok.comm.shm, Some(false));
    assert_eq!(ok.comm.shm_ring_bytes, Some(1 << 20));
    ok.validate(2).unwrap();
    for bad in [1000, 2048, 3 << 20] {
        let err = parse(&format!("[comm]\nshm_ring_bytes = {bad}\n"))
            .unwrap()
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "configs/x.toml:2:1: comm.shm_ring_bytes = {bad}: must be a power of two of at least 4096"
            )),
            "{err}"
        );
    }
}

#[test]
fn comm_hierarchical_reads_auto_on_or_off_and_refuses_anything_else_with_its_line() {
    assert_eq!(parse("").unwrap().comm.hierarchical, None);
    for (text, want) in [
        ("auto", HierarchicalMode::Auto),
        ("on", HierarchicalMode::On),
        ("off", HierarchicalMode::Off),
    ] {
        let cfg = parse(&format!("[comm]\nhierarchical = \"{text}\"\n")).unwrap();
        assert_eq!(cfg.comm.hierarchical, Some(want));
        cfg.validate(2).unwrap();
        let set = parse_with("", &[&format!("comm.hierarchical={text}")]).unwrap();
        assert_eq!(set.comm.hierarchical, Some(want));
    }
    let err = parse("[comm]\nhierarchical = \"sometimes\"\n").unwrap_err();
    assert_eq!(err.key(), Some("comm.hierarchical"), "{err}");
    let message = err.to_string();
    assert!(message.starts_with("configs/x.toml:2:"), "{message}");
    assert!(message.contains("expected one of `auto`, `on`, `off`"), "{message}");
}

#[test]
fn comm_backend_auto_picks_nccl_only_for_cuda_devices_and_what_nccl_runs() {
    let default = parse("").unwrap();
    assert_eq!(default.comm.backend, CommBackend::Auto);
    assert_eq!(
        default.validate(2).unwrap().backend,
        CommBackend::Host,
        "cpu: the host engine"
    );
    assert_eq!(default.backend_for(DeviceSpec::Cuda(None)), CommBackend::Nccl);
    assert_eq!(default.backend_for(DeviceSpec::Cuda(Some(1))), CommBackend::Nccl);
    // PowerSGD runs on the GPU (burn's matmuls on the device, its factors summed by NCCL).
    let powersgd = parse("[compression]\nmethod = \"powersgd\"\n").unwrap();
    assert_eq!(powersgd.backend_for(DeviceSpec::Cuda(None)), CommBackend::Nccl);
    // Top-k runs on the GPU (the kernels of kernels/topk.cu).
    let topk = parse("[compression]\nmethod = \"topk\"\n").unwrap();
    assert_eq!(topk.backend_for(DeviceSpec::Cuda(None)), CommBackend::Nccl);
    // fp16 and bf16 on the wire run on the GPU (the kernels of kernels/half_cast.cu).
    let half = parse("[compression]\nmethod = \"bf16\"\n").unwrap();
    assert_eq!(half.backend_for(DeviceSpec::Cuda(None)), CommBackend::Nccl);
    // What the NCCL path does not run yet (a codec's warm-up) goes to the host engine under auto.
    let late = parse("[compression]\nmethod = \"fp16\"\nstart_step = 10\n").unwrap();
    assert_eq!(late.backend_for(DeviceSpec::Cuda(None)), CommBackend::Host);
    let late_powersgd = parse("[compression]\nmethod = \"powersgd\"\nstart_step = 10\n").unwrap();
    assert_eq!(late_powersgd.backend_for(DeviceSpec::Cuda(None)), CommBackend::Host);
    // Pipeline stages pass activations on NCCL too (two-rank communicators per link).
    let pipeline = parse("[parallel]\npipeline = 2\n").unwrap();
    assert_eq!(pipeline.backend_for(DeviceSpec::Cuda(None)), CommBackend::Nccl);
    // Chosen by hand, it is kept; "tcp" is the host engine's older name.
    let host = parse("[comm]\nbackend = \"host\"\n").unwrap();
    assert_eq!(host.backend_for(DeviceSpec::Cuda(None)), CommBackend::Host);
    let tcp = parse("[comm]\nbackend = \"tcp\"\n").unwrap();
    assert_eq!(tcp.comm.backend, CommBackend::Host);
    assert_eq!(tcp.validate(2).unwrap().backend, CommBackend::Host);
}

#[test]
fn comm_backend_nccl_with_a_codec_it_does_not_run_is_refused_saying_what_to_set() {
    let text = "[comm]\nbackend = \"nccl\"\n[compression]\nmethod = \"powersgd\"\nstart_step = 10\n";
    let message = parse(text).unwrap().validate(2).unwrap_err().to_string();
    for needle in [
        "comm.backend = \"nccl\" needs a GPU",
        "comm.backend = \"nccl\" does not run a codec that starts after step 0 (compression.start_step)",
        "set comm.backend = \"host\"",
    ] {
        assert!(message.contains(needle), "missing {needle:?} in:\n{message}");
    }
    let bad = parse("[comm]\nbackend = \"gloo\"\n").unwrap_err().to_string();
    assert!(
        bad.contains("auto") && bad.contains("host") && bad.contains("nccl"),
        "{bad}"
    );
}

//! The dynamic loss scaler on N ranks over real TCP.

use std::time::Duration;

use burnrun::comm::{spawn_ranks, InitOptions};
use burnrun::precision::{
    DynamicLossScaler, LossScalerOptions, ParamSpan, PrecisionError, ScaleEventKind, StepDecision, HISTORY_CAPACITY,
};

fn options() -> InitOptions {
    InitOptions {
        timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// Three parameters in model order: 6 + 4 + 2 elements.
fn names() -> Vec<String> {
    ["layer1.weight", "layer2.weight", "layer2.bias"]
        .map(String::from)
        .to_vec()
}
const NUMELS: [usize; 3] = [6, 4, 2];

fn scaler(growth_interval: u64) -> DynamicLossScaler {
    DynamicLossScaler::new(&LossScalerOptions {
        init_scale: 1024.0,
        growth_interval,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn an_inf_on_one_rank_makes_every_rank_skip_that_step_and_halve_the_scale_then_it_grows_back() {
    let (world, interval, overflow_step) = (3usize, 4u64, 2u64);
    let out = spawn_ranks(world, &options(), |pg| {
        let names = names();
        let spans = ParamSpan::from_numels(&names, &NUMELS);
        let mut scaler = scaler(interval);
        let mut decisions = Vec::new();
        for step in 0..=overflow_step + interval {
            let mut grads = vec![0.25f32; 12];
            if step == overflow_step && pg.rank() == 1 {
                grads[7] = f32::INFINITY; // in layer2.weight
            }
            decisions.push(scaler.check_and_update(Some(&pg), step, &grads, &spans).unwrap());
        }
        (decisions, scaler)
    })
    .unwrap();
    for (rank, (decisions, scaler)) in out.iter().enumerate() {
        for (step, d) in decisions.iter().enumerate() {
            let step = step as u64;
            let want_scale = if step < overflow_step || step == overflow_step + interval {
                1024.0
            } else {
                512.0
            };
            assert_eq!(d.skip, step == overflow_step, "rank {rank} step {step}");
            assert_eq!(d.scale, want_scale, "rank {rank} step {step}");
            if step == overflow_step {
                assert_eq!(
                    d.overflow_ranks,
                    vec![1],
                    "rank {rank}: every rank learns who overflowed"
                );
                let want_name = (rank == 1).then(|| "layer2.weight".to_string());
                assert_eq!(
                    d.first_overflow, want_name,
                    "rank {rank}: only the overflowing rank names it"
                );
            } else {
                assert_eq!(
                    d,
                    &StepDecision {
                        skip: false,
                        first_overflow: None,
                        overflow_ranks: vec![],
                        scale: d.scale,
                        // The scale before this decision: a growth step's gradients carry 512.
                        scale_used: if step <= overflow_step { 1024.0 } else { 512.0 },
                    }
                );
            }
        }
        assert_eq!(scaler.skipped_steps, 1);
        assert_eq!(scaler.good_steps, 0, "the growth restarted the count");
        let kinds: Vec<_> = scaler
            .history
            .iter()
            .map(|e| (e.step, e.kind, e.scale_before, e.scale_after))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (overflow_step, ScaleEventKind::Overflow, 1024.0, 512.0),
                (overflow_step + interval, ScaleEventKind::Growth, 512.0, 1024.0)
            ],
            "rank {rank}"
        );
    }
}

#[test]
fn the_first_overflowing_parameter_in_model_order_is_named() {
    let names = names();
    let spans = ParamSpan::from_numels(&names, &NUMELS);
    let mut grads = vec![1.0f32; 12];
    grads[11] = f32::NAN; // layer2.bias
    grads[6] = f32::NEG_INFINITY; // layer2.weight, earlier in model order
    let mut scaler = scaler(2000);
    let d = scaler.check_and_update(None, 9, &grads, &spans).unwrap();
    assert!(d.skip);
    assert_eq!(d.first_overflow.as_deref(), Some("layer2.weight"));
    assert_eq!(d.overflow_ranks, vec![0]);
    assert_eq!(scaler.history[0].first_overflow.as_deref(), Some("layer2.weight"));

    // An element no span covers is still reported, by position.
    let mut grads = vec![1.0f32; 14];
    grads[13] = f32::INFINITY;
    let d = scaler.check_and_update(None, 10, &grads, &spans).unwrap();
    assert_eq!(
        d.first_overflow.as_deref(),
        Some("element 13 (outside every named parameter)")
    );
}

#[test]
fn the_scale_stays_within_min_and_max_and_a_persistent_overflow_is_reported_as_a_collapse() {
    let names = names();
    let spans = ParamSpan::from_numels(&names, &NUMELS);
    let mut scaler = DynamicLossScaler::new(&LossScalerOptions {
        init_scale: 16.0,
        min_scale: 4.0,
        max_scale: 32.0,
        growth_interval: 1,
        max_overflows_at_min_scale: Some(3),
        ..Default::default()
    })
    .unwrap();
    let good = vec![0.5f32; 12];
    let mut bad = good.clone();
    bad[0] = f32::INFINITY;
    for (step, want) in [(0, 32.0), (1, 32.0)] {
        assert_eq!(
            scaler.check_and_update(None, step, &good, &spans).unwrap().scale,
            want,
            "capped at max_scale"
        );
    }
    // 32 -> 16 -> 8 -> 4, then three overflows at the minimum: the third is a collapse.
    for (step, want) in [(2, 16.0), (3, 8.0), (4, 4.0), (5, 4.0), (6, 4.0)] {
        let d = scaler.check_and_update(None, step, &bad, &spans).unwrap();
        assert!(d.skip);
        assert_eq!(d.scale, want, "step {step}");
    }
    let err = scaler.check_and_update(None, 7, &bad, &spans).unwrap_err();
    assert!(
        matches!(
            err,
            PrecisionError::Collapsed {
                step: 7,
                consecutive: 3,
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("layer1.weight") && message.contains("minimum scale 4"),
        "{message}"
    );
    assert_eq!(scaler.skipped_steps, 6);

    // A good step at the minimum resets the count.
    let mut scaler = DynamicLossScaler::new(&LossScalerOptions {
        init_scale: 4.0,
        min_scale: 4.0,
        max_overflows_at_min_scale: Some(2),
        ..Default::default()
    })
    .unwrap();
    for step in 0..10 {
        let grads = if step % 2 == 0 { &bad } else { &good };
        scaler.check_and_update(None, step, grads, &spans).unwrap();
    }
}

#[test]
fn the_history_keeps_the_most_recent_events() {
    let mut scaler = DynamicLossScaler::new(&LossScalerOptions {
        min_scale: 1.0,
        max_overflows_at_min_scale: None,
        ..Default::default()
    })
    .unwrap();
    let bad = [f32::NAN];
    let n = HISTORY_CAPACITY as u64 + 10;
    for step in 0..n {
        scaler.check_and_update(None, step, &bad, &[]).unwrap();
    }
    assert_eq!(scaler.history.len(), HISTORY_CAPACITY);
    assert_eq!(scaler.history.back().map(|e| e.step), Some(n - 1));
    assert_eq!(scaler.scale, 1.0);
    assert_eq!(scaler.skipped_steps, n);
}

#[test]
fn unscale_divides_the_gradients_by_the_scale() {
    let scaler = scaler(10);
    let mut grads = vec![1024.0f32, -2048.0, 0.5];
    scaler.unscale(&mut grads);
    assert_eq!(grads, vec![1.0, -2.0, 0.5 / 1024.0]);
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let s = DynamicLossScaler::default();
    assert_eq!(
        (
            s.scale,
            s.growth_interval,
            s.backoff_factor,
            s.growth_factor,
            s.min_scale
        ),
        (65536.0, 2000, 0.5, 2.0, 1.0)
    );
    assert_eq!(s.max_scale, 16_777_216.0);
    assert_eq!(s.max_overflows_at_min_scale, Some(20));
}

#[test]
fn out_of_range_scaler_options_are_refused_with_the_key_named() {
    let cases = [
        (
            "backoff_factor",
            LossScalerOptions {
                backoff_factor: 1.0,
                ..Default::default()
            },
        ),
        (
            "growth_factor",
            LossScalerOptions {
                growth_factor: 1.0,
                ..Default::default()
            },
        ),
        (
            "min_scale",
            LossScalerOptions {
                min_scale: 0.0,
                ..Default::default()
            },
        ),
        (
            "init_scale",
            LossScalerOptions {
                init_scale: 0.5,
                ..Default::default()
            },
        ),
        (
            "growth_interval",
            LossScalerOptions {
                growth_interval: 0,
                ..Default::default()
            },
        ),
        (
            "max_scale",
            LossScalerOptions {
                max_scale: f32::INFINITY,
                ..Default::default()
            },
        ),
    ];
    for (key, options) in cases {
        let err = DynamicLossScaler::new(&options).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("precision.{key} = ")),
            "{key}: {err}"
        );
    }
}

#[test]
fn a_span_past_the_gradient_is_refused_with_its_name() {
    let names = names();
    let spans = ParamSpan::from_numels(&names, &NUMELS);
    let err = scaler(10).check_and_update(None, 0, &[0.0; 8], &spans).unwrap_err();
    assert!(
        err.to_string()
            .contains("`layer2.weight` spans elements 6..10 but the gradient has 8"),
        "{err}"
    );
}

#[test]
fn a_growth_step_unscales_by_the_scale_the_gradients_were_computed_with() {
    // growth_interval 10: the 10th good step grows the scale; its gradients still carry the old one.
    let mut scaler = scaler(10);
    let before = scaler.scale;
    let mut decision = None;
    for step in 0..10 {
        decision = Some(scaler.check_and_update(None, step, &[1.0], &[]).unwrap());
    }
    let decision = decision.unwrap();
    assert!(scaler.scale > before, "the 10th good step grew the scale");
    assert_eq!((decision.scale, decision.scale_used), (scaler.scale, before));
    let mut grads = vec![before * 3.0];
    decision.unscale(&mut grads);
    assert_eq!(grads, vec![3.0]);
}

//! NCCL without a GPU (feature `nccl`): finding the library where users have it (or an error that
//! lists every place looked), its version, unique ids, their exchange through the store, and
//! `ncclCommInitRank` failing cleanly. A test whose library is absent says it is skipped; CI
//! installs PyPI's `nvidia-nccl-cu12` wheel, as PyTorch does, so they run there.
#![cfg(feature = "nccl")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burnrun::comm::nccl::{candidates, exchange_unique_id, CallCheck, CheckMode, Nccl, NcclError, NCCL_SONAME};
use burnrun::comm::{fingerprint, DType, OpKind, ReduceOp};
use burnrun::env::LibrarySearch;
use burnrun::rendezvous::{MemoryStore, Store};

fn nccl_or_skip(test: &str) -> Option<&'static Nccl> {
    match Nccl::get() {
        Ok(nccl) => Some(nccl),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

#[test]
fn the_search_tries_nccl_library_then_ld_library_path_then_cuda_then_python_wheels_then_the_loader() {
    let wheel_env = std::env::temp_dir().join(format!("burnrun-nccl-search-{}", std::process::id()));
    let site = wheel_env.join("lib/python3.11/site-packages");
    std::fs::create_dir_all(&site).unwrap();
    let search = LibrarySearch {
        nccl_library: Some(PathBuf::from("/opt/nccl/lib/libnccl.so.2")),
        ld_library_path: vec![PathBuf::from("/opt/ld")],
        python_prefixes: vec![wheel_env.clone()],
        ..LibrarySearch::default()
    };
    let list = candidates(&search);
    let position = |p: &str| {
        list.iter()
            .position(|c| c == &PathBuf::from(p))
            .unwrap_or_else(|| panic!("{p} in {list:?}"))
    };
    let wheel = site.join("nvidia/nccl/lib").join(NCCL_SONAME);
    let order = [
        position("/opt/nccl/lib/libnccl.so.2"),
        position("/opt/ld/libnccl.so.2"),
        position("/usr/local/cuda/lib64/libnccl.so.2"),
        list.iter().position(|c| c == &wheel).expect("the wheel's path"),
        position(NCCL_SONAME),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{list:?}");
    let _ = std::fs::remove_dir_all(&wheel_env);
}

#[test]
fn a_library_that_is_nowhere_is_an_error_listing_every_place_looked_and_the_fix() {
    let search = LibrarySearch {
        nccl_library: Some(PathBuf::from("/nonexistent/burnrun/libnccl.so.2")),
        ld_library_path: vec![PathBuf::from("/nonexistent/ld")],
        ..LibrarySearch::default()
    };
    match Nccl::find(&search) {
        // A machine with NCCL on the loader's own path finds it by name: nothing to check then.
        Ok(nccl) => assert_eq!(nccl.path, PathBuf::from(NCCL_SONAME)),
        Err(e @ NcclError::LibraryNotFound { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("/nonexistent/burnrun/libnccl.so.2")
                    && text.contains("/nonexistent/ld/libnccl.so.2")
                    && text.contains("NCCL_LIBRARY")
                    && text.contains("nvidia-nccl-cu12"),
                "{text}"
            );
        }
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a_file_that_is_not_a_library_is_named_with_the_loaders_reason() {
    let bogus = std::env::temp_dir().join(format!("burnrun-not-nccl-{}.so.2", std::process::id()));
    std::fs::write(&bogus, b"not an ELF file").unwrap();
    let err = Nccl::load(&bogus).unwrap_err().to_string();
    assert!(err.contains(&bogus.display().to_string()), "{err}");
    let _ = std::fs::remove_file(&bogus);
}

#[test]
fn version_and_unique_ids_come_without_a_gpu() {
    let Some(nccl) = nccl_or_skip("version_and_unique_ids_come_without_a_gpu") else {
        return;
    };
    let version = nccl.version().unwrap();
    assert!(version >= 21200, "NCCL {version} at {}", nccl.path.display());
    let (a, b) = (
        nccl.unique_id().unwrap().to_bytes(),
        nccl.unique_id().unwrap().to_bytes(),
    );
    assert_eq!(a.len(), 128);
    assert!(a.iter().any(|&x| x != 0), "an id holds rank 0's address");
    assert_ne!(a, b, "every id is fresh");
    eprintln!("NCCL {version} from {}", nccl.path.display());
}

#[test]
fn every_rank_gets_rank_0s_unique_id_through_the_store() {
    let Some(nccl) = nccl_or_skip("every_rank_gets_rank_0s_unique_id_through_the_store") else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let ids: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let store = store.clone();
                scope.spawn(move || {
                    exchange_unique_id(nccl, store.as_ref(), "nccl/world/id", rank, Duration::from_secs(10))
                        .unwrap()
                        .to_bytes()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| id == &ids[0]), "one id for the whole group");
}

#[test]
fn a_rank_whose_rank_0_never_publishes_fails_naming_the_key() {
    let Some(nccl) = nccl_or_skip("a_rank_whose_rank_0_never_publishes_fails_naming_the_key") else {
        return;
    };
    let store = MemoryStore::new();
    let err = exchange_unique_id(nccl, &store, "nccl/g1/id", 1, Duration::from_millis(200)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("rank 1") && text.contains("nccl/g1/id"), "{text}");
}

#[test]
fn joining_a_communicator_without_a_gpu_fails_cleanly_naming_the_call() {
    let Some(nccl) = nccl_or_skip("joining_a_communicator_without_a_gpu_fails_cleanly_naming_the_call") else {
        return;
    };
    let id = nccl.unique_id().unwrap();
    match nccl.init_rank(id, 0, 1) {
        // A GPU machine: a one-rank communicator, destroyed when dropped.
        Ok(comm) => {
            assert!(comm.async_error().is_ok());
            eprintln!("GPU: a one-rank NCCL communicator was created and destroyed");
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("ncclCommInitRank failed"), "{text}");
            eprintln!("no GPU here: {text}");
        }
    }
}

#[test]
fn an_nccl_communicator_needs_a_cuda_driver_and_on_a_gpu_runs_its_collectives_at_world_size_1() {
    use burnrun::comm::nccl::NcclCommunicator;
    use burnrun::comm::{BufMut, BufRef, Communicator, ReduceOp};
    let test = "an_nccl_communicator_needs_a_cuda_driver";
    if nccl_or_skip(test).is_none() {
        return;
    }
    let store = MemoryStore::new();
    match NcclCommunicator::new(&store, "nccl/one/id", 0, 1, 0, Duration::from_secs(30)) {
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("CUDA: "), "{text}");
            eprintln!("no GPU here: {text}");
        }
        Ok(comm) => {
            // A GPU: the collectives for real, on host buffers staged through the device.
            let mut values = [1.0f32, -2.0, 3.5];
            comm.all_reduce(BufMut::host(&mut values), ReduceOp::Sum).unwrap();
            assert_eq!(values, [1.0, -2.0, 3.5]);
            comm.broadcast(BufMut::host(&mut values), 0).unwrap();
            let mut gathered = [0.0f32; 3];
            comm.all_gather(BufRef::host(&values), BufMut::host(&mut gathered))
                .unwrap();
            assert_eq!(gathered, values);
            comm.barrier().unwrap();
            let bad = comm.broadcast(BufMut::host(&mut values), 1).unwrap_err().to_string();
            assert!(bad.contains("root 1"), "{bad}");
            eprintln!("GPU: NCCL all_reduce, broadcast, all_gather and barrier ran at world size 1");
        }
    }
}

/// Runs `calls(rank, check)` on `world` threads sharing one store, each with its own check.
fn with_checks<T: Send + 'static>(
    world: usize,
    mode: CheckMode,
    calls: impl Fn(usize, &CallCheck) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let calls = Arc::new(calls);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (store, calls) = (store.clone(), calls.clone());
            std::thread::spawn(move || {
                let check = CallCheck::new(store, "nccl/check-test", rank, world, mode, Duration::from_secs(5));
                calls(rank, &check)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

#[test]
fn checking_every_call_finds_a_mismatched_collective_before_nccl_is_called() {
    let all_reduce = fingerprint(OpKind::AllReduce, DType::F32, 1000, None, Some(ReduceOp::Sum));
    let all_gather = fingerprint(OpKind::AllGather, DType::F32, 500, None, None);
    let results = with_checks(3, CheckMode::EveryCall, move |rank, check| {
        // Calls #0 and #1 agree; at #2 rank 2 calls another collective.
        check.before("all_reduce", 0, all_reduce)?;
        check.before("all_reduce", 1, all_reduce)?;
        if rank == 2 {
            check.before("all_gather", 2, all_gather)
        } else {
            check.before("all_reduce", 2, all_reduce)
        }
    });
    for (rank, result) in results.iter().enumerate() {
        let err = result
            .as_ref()
            .expect_err("a mismatch is an error on every rank")
            .to_string();
        assert!(err.contains("mismatch at #2"), "rank {rank}: {err}");
        if rank == 2 {
            assert!(
                err.contains("this rank called all_gather(f32 x 500)") && err.contains("peer 0"),
                "{err}"
            );
        } else {
            assert!(
                err.contains("this rank called all_reduce(f32 x 1000, sum)") && err.contains("peer 2"),
                "{err}"
            );
            assert!(err.contains("all_gather(f32 x 500)"), "{err}");
        }
    }
}

#[test]
fn checking_every_call_times_out_naming_the_rank_that_never_came() {
    let fp = fingerprint(OpKind::Broadcast, DType::BF16, 8, Some(0), None);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let check = CallCheck::new(
        store,
        "nccl/late",
        0,
        2,
        CheckMode::EveryCall,
        Duration::from_millis(200),
    );
    let err = check
        .before("broadcast", 0, fp)
        .expect_err("rank 1 never calls")
        .to_string();
    assert!(
        err.contains("peer 1") && err.contains("did not reach this call"),
        "{err}"
    );
}

#[test]
fn after_a_failure_the_report_names_the_first_differing_call_or_the_silent_rank() {
    let sum = fingerprint(OpKind::AllReduce, DType::F32, 64, None, Some(ReduceOp::Sum));
    let max = fingerprint(OpKind::AllReduce, DType::F32, 64, None, Some(ReduceOp::Max));
    // The default mode costs nothing per call; a failure at #1 compares the traces.
    let reports = with_checks(2, CheckMode::OnFailure, move |rank, check| {
        check.before("all_reduce", 0, sum).expect("no store traffic");
        check
            .before("all_reduce", 1, if rank == 0 { sum } else { max })
            .expect("no comparison before the call");
        check.diagnose(1)
    });
    assert!(
        reports[0].contains("collective mismatch at #1: this rank called all_reduce(f32 x 64, sum), rank 1 called all_reduce(f32 x 64, max)"),
        "{}",
        reports[0]
    );
    // A rank alone in its failure: the others never report.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let check = CallCheck::new(store, "nccl/alone", 1, 3, CheckMode::OnFailure, Duration::from_secs(1));
    check.before("all_reduce", 0, sum).unwrap();
    let report = check.diagnose(0);
    assert!(
        report.contains("rank(s) [0, 2] did not report") && report.contains("stuck before call #0"),
        "{report}"
    );
}

#[test]
fn the_check_mode_comes_from_burnrun_nccl_check() {
    assert_eq!(CheckMode::from_env_value(None), Ok(CheckMode::OnFailure));
    assert_eq!(CheckMode::from_env_value(Some("every")), Ok(CheckMode::EveryCall));
    assert_eq!(CheckMode::from_env_value(Some("off")), Ok(CheckMode::Off));
    let err = CheckMode::from_env_value(Some("always")).unwrap_err();
    assert!(
        err.contains("BURNRUN_NCCL_CHECK=\"always\"") && err.contains("\"every\""),
        "{err}"
    );
}

//! Resources that outlive a config snapshot: one generic mechanism for every stateful object
//! built from config — a service's `Upstream` (pools, endpoint health, breaker) today; JWKS key
//! caches, rate limiters, response caches, broker connections and plugin VMs next.
//!
//! Each snapshot holds a `Resources` registry. `compile` builds the new snapshot's registry with
//! `reuse_or_build`, which takes the previous snapshot's object of the same kind and name when
//! its config is equal by value, and builds a new one otherwise. A resource is an `Arc`: it is
//! dropped, with the background tasks it owns (`Tasks`, aborted on drop), when no live snapshot
//! refers to it any more — once the requests still running on an old snapshot have finished.
//! Request paths never look a resource up by name: `compile` hands the `Arc` to the route stack,
//! layer or backend that uses it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

/// The resources of one snapshot, by kind (Rust type) and name.
#[derive(Default)]
pub(crate) struct Resources {
    map: HashMap<(TypeId, String), Entry>,
}

struct Entry {
    config: Arc<dyn Any + Send + Sync>,
    value: Arc<dyn Any + Send + Sync>,
}

/// Whether `reuse_or_build` took the previous object over or built a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Reused,
    Built,
}

impl Resources {
    pub(crate) fn new() -> Self {
        Resources::default()
    }

    /// The resource of kind `R` named `name`: the previous snapshot's when it was built from a
    /// config equal to `config`, else a new one from `build` (which gets the previous object and
    /// its config, if any, to carry state over). Either way it is registered in `self`.
    pub(crate) fn reuse_or_build<R, C, E>(
        &mut self,
        previous: Option<&Resources>,
        name: &str,
        config: &C,
        build: impl FnOnce(Option<(&R, &C)>) -> Result<R, E>,
    ) -> Result<(Arc<R>, Outcome), E>
    where
        R: Send + Sync + 'static,
        C: PartialEq + Clone + Send + Sync + 'static,
    {
        let key = (TypeId::of::<R>(), name.to_owned());
        let prev = previous.and_then(|p| p.map.get(&key)).and_then(|e| {
            let value = e.value.clone().downcast::<R>().ok()?;
            let cfg = e.config.clone().downcast::<C>().ok()?;
            Some((value, cfg))
        });
        let (value, outcome) = match prev {
            Some((value, cfg)) if *cfg == *config => (value, Outcome::Reused),
            other => {
                let built = build(other.as_ref().map(|(v, c)| (&**v, &**c)))?;
                (Arc::new(built), Outcome::Built)
            }
        };
        self.map.insert(
            key,
            Entry {
                config: Arc::new(config.clone()),
                value: value.clone(),
            },
        );
        Ok((value, outcome))
    }

    /// The resource of kind `R` named `name` in this snapshot.
    pub(crate) fn get<R: Send + Sync + 'static>(&self, name: &str) -> Option<Arc<R>> {
        let e = self.map.get(&(TypeId::of::<R>(), name.to_owned()))?;
        e.value.clone().downcast::<R>().ok()
    }
}

/// Background tasks owned by a resource, aborted when it is dropped. A task should hold only
/// what it updates (a table, a key set), never the resource itself, so that it cannot keep the
/// resource alive.
#[derive(Default)]
pub(crate) struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Extend<tokio::task::JoinHandle<()>> for Tasks {
    fn extend<I: IntoIterator<Item = tokio::task::JoinHandle<()>>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// A stand-in for a limiter or a key cache: a counter that must survive reloads.
    struct Counter {
        hits: AtomicU32,
        _tasks: Tasks,
    }

    #[derive(Clone, PartialEq)]
    struct CounterConfig {
        limit: u32,
    }

    fn counter(
        reg: &mut Resources,
        prev: Option<&Resources>,
        name: &str,
        limit: u32,
        builds: &AtomicU32,
    ) -> (Arc<Counter>, Outcome) {
        reg.reuse_or_build(prev, name, &CounterConfig { limit }, |_| {
            builds.fetch_add(1, Ordering::Relaxed);
            Ok::<_, ()>(Counter {
                hits: AtomicU32::new(0),
                _tasks: Tasks::default(),
            })
        })
        .unwrap()
    }

    #[test]
    fn an_unchanged_resource_survives_and_a_changed_one_is_rebuilt() {
        let builds = AtomicU32::new(0);
        let mut gen1 = Resources::new();
        let (a, o) = counter(&mut gen1, None, "a", 10, &builds);
        assert_eq!(o, Outcome::Built);
        a.hits.fetch_add(5, Ordering::Relaxed);
        let (_b, _) = counter(&mut gen1, None, "b", 10, &builds);

        let mut gen2 = Resources::new();
        let (a2, o) = counter(&mut gen2, Some(&gen1), "a", 10, &builds);
        assert_eq!(o, Outcome::Reused);
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.hits.load(Ordering::Relaxed), 5, "its state survived");
        let (b2, o) = counter(&mut gen2, Some(&gen1), "b", 20, &builds);
        assert_eq!(o, Outcome::Built);
        assert_eq!(b2.hits.load(Ordering::Relaxed), 0);
        assert_eq!(builds.load(Ordering::Relaxed), 3);
        assert!(gen2.get::<Counter>("a").is_some());
        assert!(gen2.get::<Counter>("zzz").is_none());
    }

    #[test]
    fn a_kind_is_its_type_so_names_do_not_collide_across_kinds() {
        let builds = AtomicU32::new(0);
        let mut gen1 = Resources::new();
        counter(&mut gen1, None, "x", 1, &builds);
        let mut gen2 = Resources::new();
        let (s, o) = gen2
            .reuse_or_build(Some(&gen1), "x", &1u32, |_| {
                Ok::<_, ()>(String::from("other"))
            })
            .unwrap();
        assert_eq!((s.as_str(), o), ("other", Outcome::Built));
    }

    #[test]
    fn build_gets_the_previous_object_to_carry_state_over() {
        let mut gen1 = Resources::new();
        gen1.reuse_or_build(None, "s", &1u32, |_| Ok::<_, ()>(vec![1, 2]))
            .unwrap();
        let mut gen2 = Resources::new();
        let (v, _) = gen2
            .reuse_or_build(
                Some(&gen1),
                "s",
                &2u32,
                |prev: Option<(&Vec<i32>, &u32)>| {
                    let (old, cfg) = prev.unwrap();
                    assert_eq!(*cfg, 1);
                    let mut v = old.clone();
                    v.push(3);
                    Ok::<_, ()>(v)
                },
            )
            .unwrap();
        assert_eq!(*v, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resource_no_snapshot_uses_is_dropped_with_its_tasks() {
        let builds = AtomicU32::new(0);
        let ticks = Arc::new(AtomicU32::new(0));
        let mut gen1 = Resources::new();
        let t = ticks.clone();
        let (c, _) = gen1
            .reuse_or_build(None, "c", &CounterConfig { limit: 1 }, |_| {
                builds.fetch_add(1, Ordering::Relaxed);
                let mut tasks = Tasks::default();
                tasks.extend(Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        t.fetch_add(1, Ordering::Relaxed);
                    }
                })));
                Ok::<_, ()>(Counter {
                    hits: AtomicU32::new(0),
                    _tasks: tasks,
                })
            })
            .unwrap();
        let weak = Arc::downgrade(&c);
        drop(c);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(ticks.load(Ordering::Relaxed), 2);
        // The next snapshot changed it: once the old snapshot is gone, so are it and its task.
        let mut gen2 = Resources::new();
        counter(&mut gen2, Some(&gen1), "c", 2, &builds);
        assert!(weak.upgrade().is_some(), "the old snapshot still uses it");
        drop(gen1);
        assert!(weak.upgrade().is_none());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(ticks.load(Ordering::Relaxed), 2, "its task was aborted");
    }
}

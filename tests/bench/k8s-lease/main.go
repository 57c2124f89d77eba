// Command k8s-lease-bench measures failover of Kubernetes' own leader election
// (client-go k8s.io/client-go/tools/leaderelection with a coordination.k8s.io/v1 Lease,
// resourcelock.LeaseLock, ReleaseOnCancel) for the same job reaper-operator does: keep
// exactly one replica of a workload running. It is the side-by-side reference for the
// PostgreSQL lease; nothing in reaper-operator uses it.
//
// Run it (builds the binary, starts a private local control plane, runs kill9 then
// graceful, stops the control plane) from the repository root:
//
//	tests/bench/k8s-lease/run.sh                   # 30 trials per mode, 15s/10s/2s
//	TRIALS=3 TTL=3s DEADLINE=2s RETRY=1s tests/bench/k8s-lease/run.sh
//
// or by hand against any cluster:
//
//	k8s-lease-bench bench -kubeconfig K -mode kill9|graceful [-trials 30] [-ttl 15s -deadline 10s -retry 2s]
//
// # Design
//
// Two candidate processes (mode "candidate", the same binary) campaign for one Lease.
// Each candidate owns one Deployment (candidate slot a → Deployment reaper-a, slot b →
// reaper-b; the Pods are fake, kwok marks them Ready): the leader scales its own
// Deployment to 1, a standby keeps its own at 0. This is reaper-operator's layout across
// two clusters (each operator scales its cluster's Deployment), and it is the layout in
// which "the workload is back" is a real event: with one shared Deployment a SIGKILLed
// leader cannot scale anything down, the Deployment would simply stay at 1, the new
// leader's scale call would be a no-op and "pod ready" would measure nothing.
//
// A candidate:
//   - at start, scales its own Deployment to 0 (a non-leader must not run the workload),
//     then runs leaderelection.RunOrDie-style election;
//   - OnStartedLeading: prints "leading", scales its Deployment to 1 through the scale
//     subresource, prints "scaled" when the apiserver acknowledged the patch;
//   - SIGTERM: if leading, scales its Deployment to 0 and waits until its Pods are gone
//     (what client-go's ReleaseOnCancel documentation requires: everything guarded by the
//     lease has finished before the context is cancelled), prints "drained", then cancels
//     the context: client-go releases the Lease (holder "", leaseDurationSeconds 1) and
//     the process prints "released" and exits 0;
//   - losing the lease without being asked: scales its Deployment to 0 (best effort) and
//     exits 1, the usual client-go pattern (klog.Fatal in OnStoppedLeading).
//
// Every event is one JSON line on stdout with the wall-clock time in unix nanoseconds;
// all processes run on one machine, so the driver compares them with its own clock.
//
// The driver (mode "bench") creates a namespace and the two Deployments (replicas 0),
// starts two candidates, waits for a stable leader, then per trial waits a random
// fraction of the retry period (so the kill falls at a random phase of the renewal
// cycle), records T0 and sends SIGKILL (-mode kill9) or SIGTERM (-mode graceful) to the
// leader, and measures, from T0:
//   - lease_taken:        the standby's OnStartedLeading (its Lease update succeeded);
//   - deployment_scaled:  the new leader's scale patch acknowledged;
//   - pod_ready:          the new leader's Deployment status.readyReplicas >= 1, as seen
//     by the driver's Deployment watch (the Deployment was at 0 with no Pods before);
//
// and in graceful mode also, from the old leader's own timestamps:
//   - old_drained:        old leader's Pods gone (SIGTERM → scale to 0 → Pods deleted);
//   - released:           old leader's Lease release returned (OnStoppedLeading);
//   - release_to_lease:   released → lease_taken (the standby notices only at its next
//     poll: client-go does not watch the Lease, it retries every RetryPeriod·[1,1.2));
//   - release_to_scaled:  released → deployment_scaled (compare reaper-operator's
//     "graceful release → other cluster's Deployment at 1").
//
// both_ready_trials counts trials in which both Deployments had a ready Pod at the same
// time. After SIGKILL that is always the case: nothing fences the dead leader's
// workload, which keeps running until its candidate comes back (here: the driver
// restarts it right after the measurement and it scales its Deployment to 0 at start),
// in production until its Pod is restarted. Then the killed candidate is restarted as
// the new standby, the driver waits until it has scaled its Deployment to 0, its Pods
// are gone and it has polled the Lease at least once, and the next trial starts.
//
// At the end the driver prints a human summary on stderr and one JSON object (median,
// p99 — both nearest-rank —, min, max and the samples of each interval in milliseconds)
// as the last line of stdout.
//
// # What client-go's timing allows (not an artefact of this bench)
//
// The leader renews every RetryPeriod. A standby never watches the Lease: it polls, and
// its poll interval is wait.Jitter(RetryPeriod, JitterFactor=1.2), i.e. anywhere in
// [RetryPeriod, 2.2·RetryPeriod) = [2 s, 4.4 s) with the defaults. It considers the
// Lease expired LeaseDuration after the moment it last *saw the record change* (its own
// clock, not renewTime). So after SIGKILL lease_taken lies between about
// LeaseDuration − RetryPeriod and LeaseDuration + 2·2.2·RetryPeriod (13 s .. 23.8 s with
// 15s/10s/2s; 2 s .. 7.4 s with 3s/2s/1s), and after a graceful release (holder "",
// leaseDurationSeconds 1) release_to_lease lies in [0, 2.2·RetryPeriod) = [0, 4.4 s).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "candidate":
		err = candidateMain(os.Args[2:])
	case "bench":
		err = benchMain(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "k8s-lease-bench %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: k8s-lease-bench candidate|bench [flags]   (-h for the flags of a mode)")
	os.Exit(2)
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		return nil, errors.New("-kubeconfig (or $KUBECONFIG) is required")
	}
	return clientcmd.BuildConfigFromFlags("", kubeconfig)
}

// scaleDeployment sets spec.replicas through the scale subresource.
func scaleDeployment(ctx context.Context, cs kubernetes.Interface, ns, name string, replicas int32) error {
	patch := fmt.Appendf(nil, `{"spec":{"replicas":%d}}`, replicas)
	_, err := cs.AppsV1().Deployments(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}, "scale")
	return err
}

// retry calls f every 200 ms until it succeeds or ctx ends.
func retry(ctx context.Context, what string, f func(context.Context) error) error {
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		klog.ErrorS(err, "retrying", "what", what)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ---------------------------------------------------------------------------------------
// candidate

type event struct {
	Event    string `json:"event"`
	ID       string `json:"id"`
	UnixNano int64  `json:"unix_nano"`
	Time     string `json:"time"`
	Error    string `json:"error,omitempty"`
}

var emitMu sync.Mutex

func emit(id, name string, err error) {
	now := time.Now()
	e := event{Event: name, ID: id, UnixNano: now.UnixNano(), Time: now.Format(time.RFC3339Nano)}
	if err != nil {
		e.Error = err.Error()
	}
	b, _ := json.Marshal(e)
	emitMu.Lock()
	defer emitMu.Unlock()
	_, _ = os.Stdout.Write(append(b, '\n'))
}

func candidateMain(args []string) error {
	fs := flag.NewFlagSet("candidate", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	ns := fs.String("namespace", "default", "namespace of the Lease and the Deployment")
	leaseName := fs.String("lease-name", "reaper-singleton", "name of the coordination.k8s.io Lease")
	id := fs.String("identity", "", "this candidate's identity (holderIdentity), unique per process")
	deploy := fs.String("deployment", "", "this candidate's own Deployment: 1 replica while leading, 0 otherwise")
	ttl := fs.Duration("ttl", 15*time.Second, "LeaseDuration")
	deadline := fs.Duration("deadline", 10*time.Second, "RenewDeadline")
	retryPeriod := fs.Duration("retry", 2*time.Second, "RetryPeriod")
	shutdownTimeout := fs.Duration("shutdown-timeout", 30*time.Second, "on SIGTERM, how long to wait for the Deployment's Pods to be gone before releasing anyway")
	klog.InitFlags(fs)
	_ = fs.Parse(args)
	if *id == "" || *deploy == "" {
		return errors.New("-identity and -deployment are required")
	}

	cfg, err := restConfig(*kubeconfig)
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(rest.AddUserAgent(rest.CopyConfig(cfg), "k8s-lease-bench"))
	if err != nil {
		return err
	}
	// Like resourcelock.NewFromKubeconfig: the lock's client times out after half the
	// renew deadline, so one hung request cannot cost the leadership.
	lockCfg := rest.CopyConfig(cfg)
	lockCfg.Timeout = max(*deadline/2, time.Second)
	lockClient, err := kubernetes.NewForConfig(rest.AddUserAgent(lockCfg, "leader-election"))
	if err != nil {
		return err
	}

	// A standby must not run the workload.
	startCtx, cancelStart := context.WithTimeout(context.Background(), 30*time.Second)
	err = retry(startCtx, "scale own Deployment to 0", func(ctx context.Context) error {
		return scaleDeployment(ctx, cs, *ns, *deploy, 0)
	})
	cancelStart()
	if err != nil {
		return err
	}
	emit(*id, "standby", nil)

	var (
		mu       sync.Mutex
		leading  bool
		stopping bool
	)
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		emit(*id, "sigterm", nil)
		mu.Lock()
		stopping = true
		wasLeading := leading
		mu.Unlock()
		if wasLeading {
			ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
			err := drain(ctx, cs, *ns, *deploy)
			cancel()
			emit(*id, "drained", err)
		}
		cancelRun() // ReleaseOnCancel: client-go releases the Lease on its way out
	}()

	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: *ns, Name: *leaseName},
		Client:     lockClient.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: *id},
	}
	exitCode := 0
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		Name:            *leaseName,
		LeaseDuration:   *ttl,
		RenewDeadline:   *deadline,
		RetryPeriod:     *retryPeriod,
		ReleaseOnCancel: true,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(ctx context.Context) {
				emit(*id, "leading", nil)
				mu.Lock()
				if stopping {
					mu.Unlock()
					return
				}
				leading = true
				// Under mu: a SIGTERM waits for this before it drains.
				sctx, cancel := context.WithTimeout(ctx, *deadline)
				err := retry(sctx, "scale own Deployment to 1", func(ctx context.Context) error {
					return scaleDeployment(ctx, cs, *ns, *deploy, 1)
				})
				cancel()
				mu.Unlock()
				if err == nil {
					emit(*id, "scaled", nil)
				} else {
					emit(*id, "scale-failed", err)
				}
				<-ctx.Done()
			},
			OnStoppedLeading: func() {
				mu.Lock()
				wasLeading, asked := leading, stopping
				mu.Unlock()
				switch {
				case asked && wasLeading:
					emit(*id, "released", nil)
				case !asked && wasLeading:
					// Lost the lease: stop the workload (best effort) and exit.
					emit(*id, "lost", nil)
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_ = scaleDeployment(ctx, cs, *ns, *deploy, 0)
					cancel()
					exitCode = 1
				}
			},
		},
	})
	if err != nil {
		return err
	}
	le.Run(runCtx)
	if exitCode != 0 {
		os.Exit(exitCode)
	}
	return nil
}

// drain scales the Deployment to 0 and waits until none of its Pods exists any more.
func drain(ctx context.Context, cs kubernetes.Interface, ns, name string) error {
	if err := retry(ctx, "scale own Deployment to 0", func(ctx context.Context) error {
		return scaleDeployment(ctx, cs, ns, name, 0)
	}); err != nil {
		return err
	}
	d, err := cs.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil {
		return err
	}
	for {
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
		if err == nil && len(pods.Items) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the Pods of %s to be gone: %w", name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// ---------------------------------------------------------------------------------------
// bench driver

type benchConfig struct {
	kubeconfig, mode, ns, leaseName, bin, logDir string
	trials                                       int
	ttl, deadline, retry                         time.Duration
	keepNamespace                                bool
}

func benchMain(args []string) error {
	var c benchConfig
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	fs.StringVar(&c.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	fs.StringVar(&c.mode, "mode", "kill9", "how the leader is stopped: kill9 (SIGKILL) or graceful (SIGTERM)")
	fs.IntVar(&c.trials, "trials", 30, "number of failovers")
	fs.DurationVar(&c.ttl, "ttl", 15*time.Second, "LeaseDuration (whole seconds: the Lease stores seconds)")
	fs.DurationVar(&c.deadline, "deadline", 10*time.Second, "RenewDeadline")
	fs.DurationVar(&c.retry, "retry", 2*time.Second, "RetryPeriod")
	fs.StringVar(&c.ns, "namespace", "", "namespace to create (default k8s-lease-bench-MODE; replaced if it exists)")
	fs.StringVar(&c.leaseName, "lease-name", "reaper-singleton", "Lease name")
	fs.StringVar(&c.bin, "candidate-bin", "", "candidate binary (default: this executable)")
	fs.StringVar(&c.logDir, "log-dir", "", "directory for the candidates' stderr (default: a new temporary directory)")
	fs.BoolVar(&c.keepNamespace, "keep-namespace", false, "do not delete the namespace at the end")
	_ = fs.Parse(args)
	if c.mode != "kill9" && c.mode != "graceful" {
		return fmt.Errorf("-mode must be kill9 or graceful, not %q", c.mode)
	}
	if c.trials < 1 {
		return errors.New("-trials must be at least 1")
	}
	if c.ttl%time.Second != 0 {
		return errors.New("-ttl must be whole seconds (Lease.spec.leaseDurationSeconds)")
	}
	if c.ns == "" {
		c.ns = "k8s-lease-bench-" + c.mode
	}
	if c.bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		c.bin = exe
	}
	if c.logDir == "" {
		d, err := os.MkdirTemp("", "k8s-lease-bench-")
		if err != nil {
			return err
		}
		c.logDir = d
	} else if err := os.MkdirAll(c.logDir, 0o755); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return runBench(ctx, c)
}

// candidate is one child process.
type candidate struct {
	slot, id, deploy string
	cmd              *exec.Cmd
	done             chan struct{} // closed when the process has exited
	exitErr          error

	mu     sync.Mutex
	events []event
}

func (c *candidate) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// findEvent returns the first event named name received so far.
func (c *candidate) findEvent(name string) (event, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.events {
		if e.Event == name {
			return e, true
		}
	}
	return event{}, false
}

// waitEvent waits for the first event named name; its time is the candidate's clock.
func (c *candidate) waitEvent(ctx context.Context, name string, timeout time.Duration) (event, error) {
	deadline := time.Now().Add(timeout)
	for {
		if e, ok := c.findEvent(name); ok {
			return e, nil
		}
		if time.Now().After(deadline) {
			return event{}, fmt.Errorf("candidate %s: no %q event within %s", c.id, name, timeout)
		}
		if !c.alive() {
			// Drain the rest of stdout once more before giving up.
			time.Sleep(50 * time.Millisecond)
			if e, ok := c.findEvent(name); ok {
				return e, nil
			}
			return event{}, fmt.Errorf("candidate %s exited (%v) before %q", c.id, c.exitErr, name)
		}
		select {
		case <-ctx.Done():
			return event{}, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (c *candidate) wait(timeout time.Duration) error {
	select {
	case <-c.done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("candidate %s did not exit within %s", c.id, timeout)
	}
}

// snapshot of one Deployment as seen by the driver's watch, with the receive time.
type snapshot struct {
	at                 time.Time
	ready, replicas    int32
	spec               int32
	generation, obsGen int64
}

// deployWatch records every Deployment update the informer delivers.
type deployWatch struct {
	mu        sync.Mutex
	history   map[string][]snapshot
	current   map[string]snapshot
	bothReady []time.Time // moments at which an update left both Deployments with a ready Pod
}

func (w *deployWatch) observe(obj any) {
	d, ok := obj.(*appsv1.Deployment)
	if !ok {
		return
	}
	s := snapshot{at: time.Now(), ready: d.Status.ReadyReplicas, replicas: d.Status.Replicas,
		generation: d.Generation, obsGen: d.Status.ObservedGeneration}
	if d.Spec.Replicas != nil {
		s.spec = *d.Spec.Replicas
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.history[d.Name] = append(w.history[d.Name], s)
	w.current[d.Name] = s
	n := 0
	for _, cur := range w.current {
		if cur.ready >= 1 {
			n++
		}
	}
	if n >= 2 {
		w.bothReady = append(w.bothReady, s.at)
	}
}

// waitFor returns the receive time of the first update of name at or after since that
// satisfies pred.
func (w *deployWatch) waitFor(ctx context.Context, name string, since time.Time, timeout time.Duration, pred func(snapshot) bool) (time.Time, error) {
	var found time.Time
	seen := func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, s := range w.history[name] {
			if !s.at.Before(since) && pred(s) {
				found = s.at
				return true
			}
		}
		return false
	}
	err := poll(ctx, timeout, 10*time.Millisecond, seen,
		fmt.Errorf("deployment %s: condition not reached within %s", name, timeout))
	return found, err
}

func (w *deployWatch) get(name string) snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.current[name]
}

func (w *deployWatch) bothReadyBetween(from, to time.Time) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, t := range w.bothReady {
		if !t.Before(from) && !t.After(to) {
			return true
		}
	}
	return false
}

type trialResult map[string]time.Duration

func runBench(ctx context.Context, c benchConfig) (err error) {
	cfg, err := restConfig(c.kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(rest.AddUserAgent(cfg, "k8s-lease-bench-driver"))
	if err != nil {
		return err
	}
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "k8s-lease-bench[%s]: %s\n", c.mode, fmt.Sprintf(format, a...))
	}
	logf("ttl %s, deadline %s, retry %s, %d trials, namespace %s, candidate logs in %s",
		c.ttl, c.deadline, c.retry, c.trials, c.ns, c.logDir)

	if err := freshNamespace(ctx, cs, c.ns); err != nil {
		return err
	}
	if !c.keepNamespace {
		defer func() {
			dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if derr := cs.CoreV1().Namespaces().Delete(dctx, c.ns, metav1.DeleteOptions{}); derr != nil && !apierrors.IsNotFound(derr) {
				logf("deleting namespace %s: %v", c.ns, derr)
			}
		}()
	}
	slots := []string{"a", "b"}
	for _, s := range slots {
		if err := createDeployment(ctx, cs, c.ns, "reaper-"+s); err != nil {
			return err
		}
	}

	w := &deployWatch{history: map[string][]snapshot{}, current: map[string]snapshot{}}
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(c.ns))
	inf := factory.Apps().V1().Deployments().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    w.observe,
		UpdateFunc: func(_, obj any) { w.observe(obj) },
	}); err != nil {
		return err
	}
	stopInf := make(chan struct{})
	defer close(stopInf)
	factory.Start(stopInf)
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return errors.New("deployment informer did not sync")
	}

	// Children: always stopped on the way out (SIGKILL after a grace period).
	var children []*candidate
	defer func() {
		for _, ch := range children {
			if ch.alive() {
				_ = ch.cmd.Process.Signal(syscall.SIGTERM)
			}
		}
		for _, ch := range children {
			if ch.wait(c.deadline+5*time.Second) != nil {
				_ = ch.cmd.Process.Kill()
				_ = ch.wait(5 * time.Second)
			}
		}
	}()
	gen := map[string]int{}
	start := func(slot string) (*candidate, error) {
		gen[slot]++
		ch, err := startCandidate(c, slot, fmt.Sprintf("%s-%d", slot, gen[slot]))
		if err == nil {
			children = append(children, ch)
		}
		return ch, err
	}

	a, err := start("a")
	if err != nil {
		return err
	}
	b, err := start("b")
	if err != nil {
		return err
	}
	leader, standby, err := firstLeader(ctx, c, a, b)
	if err != nil {
		return err
	}
	if err := waitStable(ctx, c, cs, w, leader, standby); err != nil {
		return err
	}
	logf("initial leader %s, standby %s", leader.id, standby.id)

	var results []trialResult
	bothReadyTrials := 0
	for trial := 1; trial <= c.trials; trial++ {
		// A random phase of the leader's renewal cycle.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(rand.Int64N(int64(c.retry)))):
		}
		sig := syscall.SIGKILL
		if c.mode == "graceful" {
			sig = syscall.SIGTERM
		}
		t0 := time.Now()
		if err := leader.cmd.Process.Signal(sig); err != nil {
			return fmt.Errorf("signal %s: %w", leader.id, err)
		}
		r := trialResult{}
		lead, err := standby.waitEvent(ctx, "leading", c.ttl+c.deadline+60*time.Second)
		if err != nil {
			return fmt.Errorf("trial %d: %w", trial, err)
		}
		r["lease_taken"] = time.Unix(0, lead.UnixNano).Sub(t0)
		scaled, err := standby.waitEvent(ctx, "scaled", c.deadline+30*time.Second)
		if err != nil {
			return fmt.Errorf("trial %d: %w", trial, err)
		}
		r["deployment_scaled"] = time.Unix(0, scaled.UnixNano).Sub(t0)
		readyAt, err := w.waitFor(ctx, standby.deploy, t0, 60*time.Second, func(s snapshot) bool { return s.ready >= 1 })
		if err != nil {
			return fmt.Errorf("trial %d: %w", trial, err)
		}
		r["pod_ready"] = readyAt.Sub(t0)

		if err := leader.wait(45 * time.Second); err != nil {
			return fmt.Errorf("trial %d: %w", trial, err)
		}
		if c.mode == "graceful" {
			if leader.exitErr != nil {
				return fmt.Errorf("trial %d: %s exited with %v after SIGTERM", trial, leader.id, leader.exitErr)
			}
			drained, err := leader.waitEvent(ctx, "drained", time.Second)
			if err != nil {
				return fmt.Errorf("trial %d: %w", trial, err)
			}
			if drained.Error != "" {
				return fmt.Errorf("trial %d: %s drain: %s", trial, leader.id, drained.Error)
			}
			released, err := leader.waitEvent(ctx, "released", time.Second)
			if err != nil {
				return fmt.Errorf("trial %d: %w", trial, err)
			}
			rel := time.Unix(0, released.UnixNano)
			r["old_drained"] = time.Unix(0, drained.UnixNano).Sub(t0)
			r["released"] = rel.Sub(t0)
			r["release_to_lease"] = time.Unix(0, lead.UnixNano).Sub(rel)
			r["release_to_scaled"] = time.Unix(0, scaled.UnixNano).Sub(rel)
		}
		both := w.bothReadyBetween(t0, time.Now())
		if both {
			bothReadyTrials++
		}
		results = append(results, r)
		logf("trial %d/%d: %s -> %s: %s; both ready: %v", trial, c.trials, leader.id, standby.id, formatTrial(r), both)

		// The killed candidate comes back as the new standby.
		next, err := start(leader.slot)
		if err != nil {
			return err
		}
		leader, standby = standby, next
		if err := waitStable(ctx, c, cs, w, leader, standby); err != nil {
			return fmt.Errorf("after trial %d: %w", trial, err)
		}
	}

	out := summarize(c, results, bothReadyTrials)
	human(c, out)
	b2, err := json.Marshal(out)
	if err != nil {
		return err
	}
	fmt.Println(string(b2))
	return nil
}

func startCandidate(c benchConfig, slot, id string) (*candidate, error) {
	ch := &candidate{slot: slot, id: id, deploy: "reaper-" + slot, done: make(chan struct{})}
	logFile, err := os.Create(filepath.Join(c.logDir, "candidate-"+id+".log"))
	if err != nil {
		return nil, err
	}
	ch.cmd = exec.Command(c.bin, "candidate",
		"-kubeconfig", c.kubeconfig,
		"-namespace", c.ns,
		"-lease-name", c.leaseName,
		"-identity", id,
		"-deployment", ch.deploy,
		"-ttl", c.ttl.String(),
		"-deadline", c.deadline.String(),
		"-retry", c.retry.String(),
	)
	ch.cmd.Stderr = logFile
	// If the driver dies, so do its candidates.
	ch.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := ch.cmd.StdoutPipe()
	if err != nil {
		logFile.Close()
		return nil, err
	}
	if err := ch.cmd.Start(); err != nil {
		logFile.Close()
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var e event
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			ch.mu.Lock()
			ch.events = append(ch.events, e)
			ch.mu.Unlock()
		}
		ch.exitErr = ch.cmd.Wait()
		logFile.Close()
		close(ch.done)
	}()
	return ch, nil
}

// firstLeader waits for one of the two fresh candidates to lead.
func firstLeader(ctx context.Context, c benchConfig, a, b *candidate) (*candidate, *candidate, error) {
	deadline := time.Now().Add(c.ttl + c.deadline + 60*time.Second)
	for time.Now().Before(deadline) {
		for _, x := range []*candidate{a, b} {
			if _, err := x.waitEvent(ctx, "leading", 0); err == nil {
				if x == a {
					return a, b, nil
				}
				return b, a, nil
			}
			if !x.alive() {
				return nil, nil, fmt.Errorf("candidate %s exited: %v (log: %s)", x.id, x.exitErr, filepath.Join(c.logDir, "candidate-"+x.id+".log"))
			}
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil, nil, errors.New("no candidate became leader")
}

// waitStable waits until the leader runs its workload (scaled, a ready Pod), the standby
// has scaled its own Deployment to 0 and its Pods are gone, and the standby has had time
// to read the Lease at least once.
func waitStable(ctx context.Context, c benchConfig, cs kubernetes.Interface, w *deployWatch, leader, standby *candidate) error {
	if _, err := leader.waitEvent(ctx, "scaled", c.deadline+30*time.Second); err != nil {
		return err
	}
	since := time.Time{}
	if _, err := w.waitFor(ctx, leader.deploy, since, 60*time.Second, func(s snapshot) bool {
		return s.spec == 1 && s.ready >= 1
	}); err != nil {
		return err
	}
	stb, err := standby.waitEvent(ctx, "standby", 60*time.Second)
	if err != nil {
		return err
	}
	if err := waitNoPods(ctx, cs, c.ns, standby.deploy, 60*time.Second); err != nil {
		return err
	}
	// The standby's first election attempt runs right after "standby"; give it one
	// retry period (with client-go's jitter) to have observed the current record.
	settle := time.Until(time.Unix(0, stb.UnixNano).Add(time.Duration(1.2*float64(c.retry)) + 100*time.Millisecond))
	if settle > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(settle):
		}
	}
	if !leader.alive() || !standby.alive() {
		return fmt.Errorf("a candidate exited: %s alive %v, %s alive %v", leader.id, leader.alive(), standby.id, standby.alive())
	}
	if _, err := standby.waitEvent(ctx, "leading", 0); err == nil {
		return fmt.Errorf("standby %s is leading too", standby.id)
	}
	if cur := w.get(leader.deploy); cur.ready < 1 {
		return fmt.Errorf("leader's Deployment %s not ready", leader.deploy)
	}
	return nil
}

func waitNoPods(ctx context.Context, cs kubernetes.Interface, ns, deploy string, timeout time.Duration) error {
	sel := labels.SelectorFromSet(labels.Set{"app": deploy}).String()
	gone := func() bool {
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
		return err == nil && len(pods.Items) == 0
	}
	return poll(ctx, timeout, 50*time.Millisecond, gone,
		fmt.Errorf("pods of %s still present after %s", deploy, timeout))
}

// poll calls done every interval until it reports true. It returns timedOut once
// timeout has passed, and ctx's error if ctx ends first.
func poll(ctx context.Context, timeout, interval time.Duration, done func() bool, timedOut error) error {
	deadline := time.Now().Add(timeout)
	for {
		if done() {
			return nil
		}
		if time.Now().After(deadline) {
			return timedOut
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// freshNamespace deletes ns if it exists (waiting until it is gone) and creates it.
func freshNamespace(ctx context.Context, cs kubernetes.Interface, ns string) error {
	nsAPI := cs.CoreV1().Namespaces()
	if err := nsAPI.Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	gone := func() bool {
		_, err := nsAPI.Get(ctx, ns, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}
	if err := poll(ctx, 2*time.Minute, 200*time.Millisecond, gone,
		fmt.Errorf("namespace %s still exists after 2 minutes", ns)); err != nil {
		return err
	}
	_, err := nsAPI.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	// Pods need the namespace's default ServiceAccount (created by the controller-manager).
	hasServiceAccount := func() bool {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	}
	return poll(ctx, time.Minute, 100*time.Millisecond, hasServiceAccount,
		fmt.Errorf("no ServiceAccount %s/default after a minute", ns))
}

func createDeployment(ctx context.Context, cs kubernetes.Interface, ns, name string) error {
	zero := int32(0)
	lbl := map[string]string{"app": name}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: lbl},
		Spec: appsv1.DeploymentSpec{
			Replicas: &zero,
			Selector: &metav1.LabelSelector{MatchLabels: lbl},
			Strategy: appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: lbl},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{Name: "reaper", Image: "registry.k8s.io/pause:3.10"}},
				},
			},
		},
	}
	_, err := cs.AppsV1().Deployments(ns).Create(ctx, d, metav1.CreateOptions{})
	return err
}

// ---------------------------------------------------------------------------------------
// results

var intervalOrder = []string{"lease_taken", "deployment_scaled", "pod_ready",
	"old_drained", "released", "release_to_lease", "release_to_scaled"}

type stats struct {
	N       int       `json:"n"`
	Median  float64   `json:"median"`
	P99     float64   `json:"p99"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Samples []float64 `json:"samples"`
}

type summary struct {
	Bench           string            `json:"bench"`
	Mode            string            `json:"mode"`
	Trials          int               `json:"trials"`
	LeaseDuration   string            `json:"lease_duration"`
	RenewDeadline   string            `json:"renew_deadline"`
	RetryPeriod     string            `json:"retry_period"`
	Unit            string            `json:"unit"`
	Percentiles     string            `json:"percentiles"`
	Intervals       map[string]*stats `json:"intervals_ms"`
	BothReadyTrials int               `json:"both_ready_trials"`
}

// nearestRank returns the p-th percentile (0 < p <= 100) of sorted xs, nearest-rank.
func nearestRank(sorted []float64, p float64) float64 {
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }

func summarize(c benchConfig, results []trialResult, bothReady int) summary {
	s := summary{Bench: "client-go leaderelection (coordination.k8s.io Lease)", Mode: c.mode,
		Trials: len(results), LeaseDuration: c.ttl.String(), RenewDeadline: c.deadline.String(),
		RetryPeriod: c.retry.String(), Unit: "ms", Percentiles: "nearest-rank",
		Intervals: map[string]*stats{}, BothReadyTrials: bothReady}
	for _, name := range intervalOrder {
		var xs []float64
		for _, r := range results {
			if d, ok := r[name]; ok {
				xs = append(xs, ms(d))
			}
		}
		if len(xs) == 0 {
			continue
		}
		sorted := append([]float64(nil), xs...)
		sort.Float64s(sorted)
		s.Intervals[name] = &stats{N: len(xs), Median: nearestRank(sorted, 50), P99: nearestRank(sorted, 99),
			Min: sorted[0], Max: sorted[len(sorted)-1], Samples: xs}
	}
	return s
}

func formatTrial(r trialResult) string {
	var parts []string
	for _, name := range intervalOrder {
		if d, ok := r[name]; ok {
			parts = append(parts, fmt.Sprintf("%s %.3fs", name, d.Seconds()))
		}
	}
	return strings.Join(parts, ", ")
}

func human(c benchConfig, s summary) {
	fmt.Fprintf(os.Stderr, "\nclient-go Lease leader election, mode %s, %d trials, LeaseDuration %s / RenewDeadline %s / RetryPeriod %s\n",
		c.mode, s.Trials, c.ttl, c.deadline, c.retry)
	fmt.Fprintf(os.Stderr, "  %-18s %10s %10s %10s %10s   (from the %s, seconds; nearest-rank)\n",
		"interval", "median", "p99", "min", "max", map[string]string{"kill9": "SIGKILL", "graceful": "SIGTERM"}[c.mode])
	for _, name := range intervalOrder {
		st, ok := s.Intervals[name]
		if !ok {
			continue
		}
		from := ""
		if strings.HasPrefix(name, "release_to") {
			from = "  (from the release)"
		}
		fmt.Fprintf(os.Stderr, "  %-18s %10.3f %10.3f %10.3f %10.3f%s\n", name,
			st.Median/1000, st.P99/1000, st.Min/1000, st.Max/1000, from)
	}
	fmt.Fprintf(os.Stderr, "  both Deployments ready at once in %d of %d trials\n\n", s.BothReadyTrials, s.Trials)
}

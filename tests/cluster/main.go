// Command atelier-testcluster runs a complete Kubernetes control plane in one
// process: embedded etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler, all built from the k8s.io/kubernetes Go modules.
//
// It is a test fixture: fresh certificates and an empty etcd at every start,
// nothing kept after exit except the kubeconfig and the key material in --dir.
// There is no kubelet and no kube-proxy.
//
// Readiness contract: once kube-apiserver's /readyz answers "ok", the
// controller-manager and the scheduler are running and the controllers have
// created the default ServiceAccount and the kube-root-ca.crt ConfigMap in the
// "default" namespace, the command writes DIR/ready (containing the server
// URL) and prints "READY https://127.0.0.1:PORT" on stdout. SIGTERM or SIGINT
// stop every component, close etcd, remove DIR/ready and exit 0.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/util/compatibility"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/component-base/version"
	"k8s.io/klog/v2"
)

func main() {
	os.Exit(run())
}

// component is one goroutine-hosted part of the control plane.
type component struct {
	name    string
	started bool
	done    chan struct{}
	err     error
}

func newComponent(name string) *component {
	return &component{name: name, done: make(chan struct{})}
}

func (c *component) start(f func() error) {
	c.started = true
	go func() {
		defer close(c.done)
		c.err = f()
	}()
}

// wait returns once the component has stopped or timeout has passed.
func (c *component) wait(timeout time.Duration) {
	if !c.started {
		return
	}
	select {
	case <-c.done:
		if c.err != nil && !errors.Is(c.err, context.Canceled) {
			klog.InfoS("component stopped with error", "component", c.name, "err", c.err)
		}
	case <-time.After(timeout):
		klog.Warningf("%s did not stop within %s", c.name, timeout)
	}
}

// doneOrNil lets a select ignore components that were never started.
func (c *component) doneOrNil() <-chan struct{} {
	if !c.started {
		return nil
	}
	return c.done
}

func run() int {
	var (
		dir            string
		port           int
		verbosity      int
		startupTimeout time.Duration
		controllers    []string
		apiserverArgs  []string
		kcmArgs        []string
		schedulerArgs  []string
		showVersion    bool
		logFile        string
		quiet          bool
	)
	fs := pflag.NewFlagSet("atelier-testcluster", pflag.ContinueOnError)
	fs.StringVar(&dir, "dir", "", "Working directory (required): kubeconfig, ready file, PKI and the temporary etcd data go here.")
	fs.IntVar(&port, "port", 0, "Secure port of kube-apiserver on 127.0.0.1; 0 picks a free port.")
	fs.IntVarP(&verbosity, "v", "v", 0, "klog verbosity of all components.")
	fs.DurationVar(&startupTimeout, "startup-timeout", 2*time.Minute, "Give up (exit 1) if the cluster is not ready within this time.")
	fs.StringSliceVar(&controllers, "controllers", defaultControllers, "kube-controller-manager controllers to run (same syntax as its --controllers flag).")
	fs.StringArrayVar(&apiserverArgs, "apiserver-arg", nil, "Extra kube-apiserver flag, e.g. --apiserver-arg=--feature-gates=Foo=true (repeatable).")
	fs.StringArrayVar(&kcmArgs, "controller-manager-arg", nil, "Extra kube-controller-manager flag (repeatable).")
	fs.StringArrayVar(&schedulerArgs, "scheduler-arg", nil, "Extra kube-scheduler flag (repeatable).")
	fs.StringVar(&logFile, "log-file", "cluster.log", "Copy of the complete log of all components; relative paths are inside --dir; empty disables.")
	fs.BoolVar(&quiet, "quiet", true, "On stderr, show only warnings, errors and this program's own messages (the --log-file keeps everything).")
	fs.BoolVar(&showVersion, "version", false, "Print the Kubernetes version and exit.")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return 2
	}
	if showVersion {
		fmt.Println(version.Get().GitVersion)
		return 0
	}
	if dir == "" {
		fmt.Fprintln(os.Stderr, "atelier-testcluster: --dir is required")
		fs.Usage()
		return 2
	}

	begin := time.Now()
	if err := setup(dir); err != nil {
		fmt.Fprintf(os.Stderr, "atelier-testcluster: %v\n", err)
		return 1
	}
	dir, _ = filepath.Abs(dir)
	readyFile := filepath.Join(dir, "ready")
	kubeconfig := filepath.Join(dir, "kubeconfig")

	// All components log through klog; route it through one sink that keeps
	// stderr short and the log file complete.
	if logFile != "" && !filepath.IsAbs(logFile) {
		logFile = filepath.Join(dir, logFile)
	}
	sink, err := newLogSink(logFile, quiet)
	if err != nil {
		fmt.Fprintf(os.Stderr, "atelier-testcluster: %v\n", err)
		return 1
	}
	defer sink.Close()
	logCfg := logsapi.NewLoggingConfiguration()
	logCfg.Verbosity = logsapi.VerbosityLevel(verbosity)
	if err := logsapi.ValidateAndApplyWithOptions(logCfg, &logsapi.LoggingOptions{ErrorStream: sink, InfoStream: sink}, utilfeature.DefaultFeatureGate); err != nil {
		fmt.Fprintf(os.Stderr, "atelier-testcluster: logging: %v\n", err)
		return 1
	}
	klog.InfoS("starting", "version", version.Get().GitVersion, "dir", dir, "log", logFile)

	sigCtx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()

	fail := func(format string, args ...any) int {
		klog.Errorf(format, args...)
		klog.Flush()
		return 1
	}

	p, err := generatePKI(filepath.Join(dir, "pki"))
	if err != nil {
		return fail("generating certificates: %v", err)
	}

	listener, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return fail("listening on 127.0.0.1:%d: %v", port, err)
	}
	serverURL := fmt.Sprintf("https://127.0.0.1:%d", listener.Addr().(*net.TCPAddr).Port)
	if err := p.writeKubeconfig(kubeconfig, serverURL); err != nil {
		listener.Close()
		return fail("writing kubeconfig: %v", err)
	}

	etcdDir, err := os.MkdirTemp(dir, "etcd-")
	if err != nil {
		listener.Close()
		return fail("creating etcd data dir: %v", err)
	}
	etcd, etcdURL, err := startEtcd(etcdDir, sink)
	if err != nil {
		listener.Close()
		os.RemoveAll(etcdDir)
		return fail("%v", err)
	}

	apiserver := newComponent("kube-apiserver")
	kcm := newComponent("kube-controller-manager")
	scheduler := newComponent("kube-scheduler")
	apiCtx, apiCancel := context.WithCancel(context.Background())
	ctlCtx, ctlCancel := context.WithCancel(context.Background())

	shutdown := func() {
		sink.stopping.Store(true)
		os.Remove(readyFile)
		ctlCancel()
		kcm.wait(15 * time.Second)
		scheduler.wait(10 * time.Second)
		apiCancel()
		if !apiserver.started {
			listener.Close()
		}
		apiserver.wait(30 * time.Second)
		etcd.Close()
		os.RemoveAll(etcdDir)
		klog.Flush()
	}
	defer func() {
		if r := recover(); r != nil {
			shutdown()
			panic(r)
		}
	}()

	exitCode, err := func() (int, error) {
		// Parse every component's flags before anything starts, then fix
		// the shared feature gates and emulation version once.
		apiOpts, err := apiServerOptions(p, etcdURL, listener, apiserverArgs)
		if err != nil {
			return 1, err
		}
		kcmOpts, err := controllerManagerOptions(p, kubeconfig, controllers, kcmArgs)
		if err != nil {
			return 1, err
		}
		schedOpts, err := schedulerOptions(kubeconfig, schedulerArgs)
		if err != nil {
			return 1, err
		}
		if err := compatibility.DefaultComponentGlobalsRegistry.Set(); err != nil {
			return 1, err
		}
		return serve(sigCtx, stopSignals, begin, apiserver, kcm, scheduler,
			func() error { return runAPIServer(apiCtx, apiOpts) },
			func() error { return runControllerManager(ctlCtx, kcmOpts) },
			func() (func() error, error) { return setupScheduler(ctlCtx, schedOpts) },
			kubeconfig, serverURL, readyFile, startupTimeout, etcd.Err()), nil
	}()
	if err != nil {
		klog.Errorf("%v", err)
	}
	shutdown()
	if exitCode == 0 {
		klog.Info("atelier-testcluster stopped")
	}
	klog.Flush()
	return exitCode
}

func setup(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// A stale ready file from an earlier run must never be mistaken for readiness.
	if err := os.Remove(filepath.Join(dir, "ready")); err != nil && !os.IsNotExist(err) {
		return err
	}
	// Left-overs of a run that was killed hard.
	old, _ := filepath.Glob(filepath.Join(dir, "etcd-*"))
	for _, o := range old {
		os.RemoveAll(o)
	}
	// Components must not print client-go deprecation warnings about their own requests.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	return nil
}

// serve starts the components, signals readiness and waits for a signal or a
// failure. It returns the process exit code; the caller shuts everything down.
func serve(sigCtx context.Context, stopSignals func(), begin time.Time,
	apiserver, kcm, scheduler *component,
	runAPI, runKCM func() error, setupSched func() (func() error, error),
	kubeconfig, serverURL, readyFile string, startupTimeout time.Duration, etcdErr <-chan error) int {

	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		klog.Errorf("reading kubeconfig: %v", err)
		return 1
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		klog.Errorf("client: %v", err)
		return 1
	}

	startCtx, cancelStart := context.WithTimeout(sigCtx, startupTimeout)
	defer cancelStart()

	apiserver.start(runAPI)
	apiErr := make(chan error, 1)
	go func() { <-apiserver.done; apiErr <- apiserver.err }()
	if err := waitReady(startCtx, cs, apiErr); err != nil {
		if sigCtx.Err() != nil {
			return 0
		}
		klog.Errorf("%v", err)
		return 1
	}
	klog.InfoS("kube-apiserver ready", "url", serverURL, "after", time.Since(begin).Round(time.Millisecond))

	runSched, err := setupSched()
	if err != nil {
		klog.Errorf("%v", err)
		return 1
	}
	kcm.start(runKCM)
	scheduler.start(runSched)

	if err := waitBootstrapped(startCtx, cs, kcm, scheduler); err != nil {
		if sigCtx.Err() != nil {
			return 0
		}
		klog.Errorf("%v", err)
		return 1
	}

	tmp := readyFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(serverURL+"\n"), 0o644); err == nil {
		err = os.Rename(tmp, readyFile)
	}
	if err != nil {
		klog.Errorf("writing %s: %v", readyFile, err)
		return 1
	}
	fmt.Printf("READY %s\n", serverURL)
	os.Stdout.Sync()
	klog.InfoS("cluster ready", "url", serverURL, "kubeconfig", kubeconfig,
		"version", version.Get().GitVersion, "startup", time.Since(begin).Round(time.Millisecond))

	select {
	case <-sigCtx.Done():
		stopSignals() // a second signal kills the process the default way
		klog.Info("signal received, shutting down")
		return 0
	case <-apiserver.done:
		klog.Errorf("kube-apiserver exited unexpectedly: %v", apiserver.err)
	case <-kcm.done:
		klog.Errorf("kube-controller-manager exited unexpectedly: %v", kcm.err)
	case <-scheduler.done:
		klog.Errorf("kube-scheduler exited unexpectedly: %v", scheduler.err)
	case err := <-etcdErr:
		klog.Errorf("etcd failed: %v", err)
	}
	return 1
}

// waitBootstrapped waits until the controller-manager has done the work every
// test needs before creating pods: the default ServiceAccount (without it the
// ServiceAccount admission plugin rejects pods) and the kube-root-ca.crt
// ConfigMap (projected service-account volumes reference it).
func waitBootstrapped(ctx context.Context, cs kubernetes.Interface, kcm, scheduler *component) error {
	var missing []string
	for {
		missing = missing[:0]
		if _, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			if !apierrors.IsNotFound(err) && ctx.Err() == nil {
				klog.V(2).InfoS("waiting for default ServiceAccount", "err", err)
			}
			missing = append(missing, "serviceaccount default/default")
		}
		if _, err := cs.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
			missing = append(missing, "configmap default/kube-root-ca.crt")
		}
		if len(missing) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("controllers did not bootstrap in time, missing: %s", strings.Join(missing, ", "))
		case <-kcm.doneOrNil():
			return fmt.Errorf("kube-controller-manager exited: %v", kcm.err)
		case <-scheduler.doneOrNil():
			return fmt.Errorf("kube-scheduler exited: %v", scheduler.err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/kubernetes"
	cliflag "k8s.io/component-base/cli/flag"

	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	schedulerapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	scheduleroptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

const (
	serviceClusterIPRange = "10.96.0.0/16"
	apiServerServiceIP    = "10.96.0.1" // first address of serviceClusterIPRange
	serviceAccountIssuer  = "https://kubernetes.default.svc.cluster.local"
)

// defaultControllers are the kube-controller-manager controllers started unless
// --controllers says otherwise. Controllers that need real nodes, cloud
// providers or CSI drivers (node-ipam, attach-detach, expander, csr signing,
// HPA, resource claims, ...) are left out.
var defaultControllers = []string{
	"clusterrole-aggregation-controller",
	"cronjob-controller",
	"daemonset-controller",
	"deployment-controller",
	"disruption-controller",
	"endpoints-controller",
	"endpointslice-controller",
	"endpointslice-mirroring-controller",
	"ephemeral-volume-controller",
	"garbage-collector-controller",
	"job-controller",
	"namespace-controller",
	"node-lifecycle-controller",
	"persistentvolume-binder-controller",
	"persistentvolume-protection-controller",
	"persistentvolumeclaim-protection-controller",
	"pod-garbage-collector-controller",
	"replicaset-controller",
	"replicationcontroller-controller",
	"resourcequota-controller",
	"root-ca-certificate-publisher-controller",
	"serviceaccount-controller",
	"serviceaccount-token-controller",
	"statefulset-controller",
	"taint-eviction-controller",
	"ttl-after-finished-controller",
	"ttl-controller",
	"validatingadmissionpolicy-status-controller",
}

// freePort asks the kernel for a free TCP port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// parseInto parses args into the union of the named flag sets.
func parseInto(component string, fss cliflag.NamedFlagSets, args []string) error {
	fs := pflag.NewFlagSet(component, pflag.ContinueOnError)
	for _, name := range fss.Order {
		fs.AddFlagSet(fss.FlagSets[name])
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%s flags: %w", component, err)
	}
	return nil
}

// ---------------------------------------------------------------- etcd

// etcdLogger writes etcd's warnings and errors as JSON lines into w.
func etcdLogger(w io.Writer) *zap.Logger {
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "ts"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), zap.NewAtomicLevelAt(zap.WarnLevel))
	return zap.New(core).Named("etcd")
}

func startEtcd(dataDir string, logw io.Writer) (*embed.Etcd, string, error) {
	var lastErr error
	// Ports are picked by probing; retry in the unlikely case another process
	// grabs one in between.
	for attempt := 0; attempt < 3; attempt++ {
		clientPort, err := freePort()
		if err != nil {
			return nil, "", err
		}
		peerPort, err := freePort()
		if err != nil {
			return nil, "", err
		}
		clientURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
		peerURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}

		cfg := embed.NewConfig()
		cfg.Name = "atelier"
		cfg.Dir = dataDir
		cfg.ListenClientUrls = []url.URL{clientURL}
		cfg.AdvertiseClientUrls = []url.URL{clientURL}
		cfg.ListenPeerUrls = []url.URL{peerURL}
		cfg.AdvertisePeerUrls = []url.URL{peerURL}
		cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
		cfg.ListenMetricsUrls = nil
		cfg.EnableGRPCGateway = false
		// Throw-away data: durability is not needed, speed is.
		cfg.UnsafeNoFsync = true
		cfg.Logger = "zap"
		cfg.LogLevel = "warn"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(etcdLogger(logw))

		e, err := embed.StartEtcd(cfg)
		if err != nil {
			lastErr = err
			_ = os.RemoveAll(dataDir)
			continue
		}
		select {
		case <-e.Server.ReadyNotify():
			return e, clientURL.String(), nil
		case err := <-e.Err():
			e.Close()
			lastErr = err
		case <-time.After(60 * time.Second):
			e.Server.Stop()
			e.Close()
			return nil, "", fmt.Errorf("etcd did not become ready within 60s")
		}
	}
	return nil, "", fmt.Errorf("starting etcd: %w", lastErr)
}

// ---------------------------------------------------------------- kube-apiserver

// apiServerOptions builds and parses the kube-apiserver options.
func apiServerOptions(p *pki, etcdURL string, listener net.Listener, extra []string) (*apiserveroptions.ServerRunOptions, error) {
	s := apiserveroptions.NewServerRunOptions()
	fss := s.Flags()
	port := listener.Addr().(*net.TCPAddr).Port
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--advertise-address=127.0.0.1",
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.caCert,
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + p.saPub,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=" + serviceClusterIPRange,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,ResourceQuota," +
			"PodSecurity,NodeRestriction,DefaultStorageClass,DefaultTolerationSeconds,Priority," +
			"MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
		"--allow-privileged=true",
		// 127.0.0.1 is not a valid Endpoints address, so the kubernetes
		// Service is created without endpoints; clients use the kubeconfig.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--enable-priority-and-fairness=true",
		"--event-ttl=1h",
	}
	args = append(args, extra...)
	if err := parseInto("kube-apiserver", fss, args); err != nil {
		return nil, err
	}
	// Use the listener opened by main, so the port is known before start-up
	// and nobody can take it in between.
	s.SecureServing.Listener = listener
	s.SecureServing.BindPort = port
	return s, nil
}

func runAPIServer(ctx context.Context, s *apiserveroptions.ServerRunOptions) error {
	completed, err := s.Complete(ctx)
	if err != nil {
		return fmt.Errorf("kube-apiserver options: %w", err)
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return fmt.Errorf("kube-apiserver options: %w", utilerrors.NewAggregate(errs))
	}
	return apiserverapp.Run(ctx, completed)
}

// ---------------------------------------------------------------- kube-controller-manager

// controllerManagerOptions builds and parses the kube-controller-manager options.
func controllerManagerOptions(p *pki, kubeconfig string, controllers []string, extra []string) (*kcmoptions.KubeControllerManagerOptions, error) {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, err
	}
	fss := s.Flags(kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases())
	s.ParsedFlags = &fss
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--controllers=" + strings.Join(controllers, ","),
		"--service-account-private-key-file=" + p.saKey,
		"--root-ca-file=" + p.caCert,
		"--service-cluster-ip-range=" + serviceClusterIPRange,
		"--profiling=false",
		// Fast feedback for tests: react quickly to deleted pods and namespaces.
		"--concurrent-gc-syncs=10",
		"--namespace-sync-period=30s",
		"--pvclaimbinder-sync-period=2s",
	}
	args = append(args, extra...)
	if err := parseInto("kube-controller-manager", fss, args); err != nil {
		return nil, err
	}
	s.ControllerShutdownTimeout = 5 * time.Second
	return s, nil
}

func runControllerManager(ctx context.Context, s *kcmoptions.KubeControllerManagerOptions) error {
	c, err := s.Config(ctx, kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases())
	if err != nil {
		return fmt.Errorf("kube-controller-manager options: %w", err)
	}
	return kcmapp.Run(ctx, c.Complete())
}

// ---------------------------------------------------------------- kube-scheduler

// schedulerOptions builds and parses the kube-scheduler options.
func schedulerOptions(kubeconfig string, extra []string) (*scheduleroptions.Options, error) {
	o := scheduleroptions.NewOptions()
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false",
	}
	args = append(args, extra...)
	if err := parseInto("kube-scheduler", *o.Flags, args); err != nil {
		return nil, err
	}
	return o, nil
}

// setupScheduler builds the scheduler synchronously (so configuration errors
// surface before readiness) and returns the function that runs it.
func setupScheduler(ctx context.Context, o *scheduleroptions.Options) (func() error, error) {
	cc, sched, err := schedulerapp.Setup(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("kube-scheduler setup: %w", err)
	}
	return func() error {
		err := schedulerapp.Run(ctx, cc, sched)
		if ctx.Err() != nil {
			// Run always returns an error ("finished without leader elect")
			// when its context ends; that is the normal way out.
			return nil
		}
		return err
	}, nil
}

// waitReady polls /readyz until it answers "ok".
func waitReady(ctx context.Context, cs kubernetes.Interface, errCh <-chan error) error {
	var last string
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		cancel()
		if err == nil && string(body) == "ok" {
			return nil
		}
		if err != nil {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kube-apiserver not ready: %v (last: %s)", ctx.Err(), last)
		case err := <-errCh:
			return fmt.Errorf("kube-apiserver exited: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

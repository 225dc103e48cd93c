package main

import (
	"bytes"
	"io"
	"os"
	"sync"
	"sync/atomic"
)

// logSink receives every klog line of all components. It copies everything to
// an optional log file and, in quiet mode, passes only what matters for a test
// run to stderr: warnings and errors (minus known start-up noise) and this
// program's own messages.
type logSink struct {
	mu       sync.Mutex
	file     io.WriteCloser
	quiet    bool
	stderr   io.Writer
	stopping atomic.Bool
}

// noise are substrings of warning/error lines that every healthy start
// produces and that carry no information for a test.
var noise = [][]byte{
	[]byte("] [core] "),                                    // gRPC connection churn of the etcd clients
	[]byte("because it has no resources"),                  // "Skipping API x/v1beta1 ..."
	[]byte("The manifest file is empty"),                   // no static pod manifests (no kubelet)
	[]byte("Found stale data, removed previous endpoints"), // first start, endpoint reconciler none
	[]byte(`namespaces \"kube-system\" not found`),         // start-up race, retried by the apiserver
	[]byte(`namespaces "kube-system" not found`),
}

func (s *logSink) keep(line []byte) bool {
	if !s.quiet || len(line) == 0 {
		return true
	}
	switch line[0] {
	case '{':
		// etcd (zap, JSON): errors only, and none once shutdown has begun,
		// when closing listeners makes etcd log errors by design.
		return !s.stopping.Load() && bytes.Contains(line, []byte(`"level":"error"`))
	case 'I':
		// Only this program's own progress lines.
		head := line
		if i := bytes.IndexByte(line, ']'); i > 0 {
			head = line[:i]
		}
		return bytes.Contains(head, []byte(" main.go:"))
	case 'W', 'E':
		for _, n := range noise {
			if bytes.Contains(line, n) {
				return false
			}
		}
	}
	return true
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.file != nil {
		_, _ = s.file.Write(p)
	}
	if s.keep(p) {
		_, _ = s.stderr.Write(p)
	}
	return len(p), nil
}

func (s *logSink) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.file != nil {
		_ = s.file.Close()
		s.file = nil
	}
}

func newLogSink(path string, quiet bool) (*logSink, error) {
	s := &logSink{quiet: quiet, stderr: os.Stderr}
	if path != "" {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
		if err != nil {
			return nil, err
		}
		s.file = f
	}
	return s, nil
}

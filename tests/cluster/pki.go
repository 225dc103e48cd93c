package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// pki holds the paths of the key material generated for one cluster start.
// Everything is created fresh at every start; nothing is reused between runs.
type pki struct {
	dir string

	caCert, caKey           string // cluster CA (signs serving and client certificates)
	servingCert, servingKey string // kube-apiserver serving certificate (127.0.0.1, localhost)
	adminCert, adminKey     string // admin client certificate, O=system:masters
	saKey, saPub            string // service-account token signing key pair

	caPEM, adminCertPEM, adminKeyPEM []byte
}

type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
}

func writePEM(path, typ string, der []byte, mode os.FileMode) ([]byte, error) {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	return data, os.WriteFile(path, data, mode)
}

func writeKey(path string, key crypto.Signer) ([]byte, error) {
	// PKCS#8 ("PRIVATE KEY") is understood by client-go, openssl, rustls and
	// native-tls alike.
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// issue creates a certificate for tmpl signed by parent (self-signed when parent is nil).
func issue(tmpl *x509.Certificate, parent *keyPair) (*keyPair, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = sn
	tmpl.NotBefore = time.Now().Add(-time.Hour).UTC()
	tmpl.NotAfter = time.Now().Add(10 * 365 * 24 * time.Hour).UTC()
	signerCert, signerKey := tmpl, crypto.Signer(key)
	if parent != nil {
		signerCert, signerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signerCert, key.Public(), signerKey)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &keyPair{cert: cert, key: key}, nil
}

func (kp *keyPair) write(certPath, keyPath string) (certPEM, keyPEM []byte, err error) {
	if certPEM, err = writePEM(certPath, "CERTIFICATE", kp.cert.Raw, 0o644); err != nil {
		return nil, nil, err
	}
	keyPEM, err = writeKey(keyPath, kp.key)
	return certPEM, keyPEM, err
}

// generatePKI writes a CA, the apiserver serving certificate, the admin client
// certificate and the service-account signing key pair into dir.
func generatePKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{
		dir:         dir,
		caCert:      filepath.Join(dir, "ca.crt"),
		caKey:       filepath.Join(dir, "ca.key"),
		servingCert: filepath.Join(dir, "apiserver.crt"),
		servingKey:  filepath.Join(dir, "apiserver.key"),
		adminCert:   filepath.Join(dir, "admin.crt"),
		adminKey:    filepath.Join(dir, "admin.key"),
		saKey:       filepath.Join(dir, "sa.key"),
		saPub:       filepath.Join(dir, "sa.pub"),
	}

	ca, err := issue(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "atelier-testcluster-ca"},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil)
	if err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}
	if p.caPEM, _, err = ca.write(p.caCert, p.caKey); err != nil {
		return nil, err
	}

	serving, err := issue(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames: []string{
			"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP(apiServerServiceIP)},
	}, ca)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	if _, _, err = serving.write(p.servingCert, p.servingKey); err != nil {
		return nil, err
	}

	admin, err := issue(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "atelier-admin", Organization: []string{"system:masters"}},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}, ca)
	if err != nil {
		return nil, fmt.Errorf("admin certificate: %w", err)
	}
	if p.adminCertPEM, p.adminKeyPEM, err = admin.write(p.adminCert, p.adminKey); err != nil {
		return nil, err
	}

	sa, err := newKey()
	if err != nil {
		return nil, err
	}
	if _, err = writeKey(p.saKey, sa); err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(sa.Public())
	if err != nil {
		return nil, err
	}
	if _, err = writePEM(p.saPub, "PUBLIC KEY", pubDER, 0o644); err != nil {
		return nil, err
	}
	return p, nil
}

// writeKubeconfig writes an admin kubeconfig with everything embedded, so the
// file stays valid when copied elsewhere.
func (p *pki) writeKubeconfig(path, server string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["atelier"] = &clientcmdapi.Cluster{
		Server:                   server,
		CertificateAuthorityData: p.caPEM,
	}
	cfg.AuthInfos["atelier-admin"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: p.adminCertPEM,
		ClientKeyData:         p.adminKeyPEM,
	}
	cfg.Contexts["atelier"] = &clientcmdapi.Context{
		Cluster:   "atelier",
		AuthInfo:  "atelier-admin",
		Namespace: "default",
	}
	cfg.CurrentContext = "atelier"
	tmp := path + ".tmp"
	if err := clientcmd.WriteToFile(*cfg, tmp); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

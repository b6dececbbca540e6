package worker

import (
	"bytes"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The keys in testdata/pkcs8 are one P-256 key (plain.pem), encrypted with
// the password "s3cret" by OpenSSL 3.0:
//
//	openssl pkcs8 -topk8 -in plain.pem -v2 aes-256-cbc -v2prf hmacWithSHA256
//	openssl pkcs8 -topk8 -in plain.pem -v2 aes-128-cbc -v2prf hmacWithSHA1
//	openssl pkcs8 -topk8 -in plain.pem -v2 des3 -v2prf hmacWithSHA512
//	openssl pkcs8 -topk8 -in plain.pem -scrypt
//	openssl pkcs8 -topk8 -in plain.pem -v1 PBE-SHA1-3DES
func readPEM(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "pkcs8", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecryptKeyPKCS8(t *testing.T) {
	plain, _ := pem.Decode(readPEM(t, "plain.pem"))
	for _, name := range []string{"aes256-sha256.pem", "aes128-sha1.pem", "des3-sha512.pem"} {
		out, err := decryptKey(readPEM(t, name), "s3cret")
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		b, _ := pem.Decode(out)
		if b == nil || b.Type != "PRIVATE KEY" || !bytes.Equal(b.Bytes, plain.Bytes) {
			t.Errorf("%s: decrypted to a block other than plain.pem's", name)
		}
	}
}

func TestDecryptKeyPKCS8Refusals(t *testing.T) {
	for _, tc := range []struct{ name, password, want string }{
		{"aes256-sha256.pem", "", "the key is encrypted and no password is given"},
		{"aes256-sha256.pem", "wrong", "the password does not decrypt the key"},
		{"des3-sha512.pem", "S3cret", "the password does not decrypt the key"},
		{"scrypt.pem", "s3cret", "derived with scrypt"},
		{"pbes1.pem", "s3cret", "only PBES2 (openssl's default) is read"},
	} {
		_, err := decryptKey(readPEM(t, tc.name), tc.password)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s with %q: %v, want %q", tc.name, tc.password, err, tc.want)
		}
		if err != nil && tc.password != "" && strings.Contains(err.Error(), tc.password) {
			t.Errorf("%s: the error shows the password: %v", tc.name, err)
		}
	}
	// Damaged data is an error, never a panic.
	b, _ := pem.Decode(readPEM(t, "aes256-sha256.pem"))
	for cut := 1; cut < len(b.Bytes); cut += 7 {
		if _, err := decryptPKCS8(b.Bytes[:cut], "s3cret"); err == nil {
			t.Errorf("cut at %d: no error", cut)
		}
	}
}

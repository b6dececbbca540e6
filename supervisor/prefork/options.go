package prefork

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// Option is one setting read from a flag, else from an environment
// variable, else left at its default. Main reads the process model's
// options and then App.Options; usage lists them all, grouped.
type Option struct {
	// Group is the usage heading the option is listed under.
	Group string
	// Flag is the flag name without dashes; "" for a setting read only
	// from the environment (a secret: a command line shows in ps).
	Flag string
	// NegFlag is the --no-* form of a switch, or "".
	NegFlag string
	// Arg is the value's placeholder in usage; "" makes the flag a switch.
	Arg string
	// Env are the variables read, in order; the first one set wins.
	Env []string
	// Default is the default as usage and the documentation show it.
	Default string
	// Help is usage's one-line meaning.
	Help string
	// Repeat lets the flag be given several times; the values add up
	// into a comma list, as the variable holds them.
	Repeat bool
	// KeepEmpty makes a variable set to "" a value rather than unset.
	KeepEmpty bool
	// Master marks a setting only the master uses (where to bind, how many
	// workers, the metrics address and its token): workers get neither its
	// flag nor its variables, and ignore the variables if an env file
	// holds them, so a worker, the process that parses untrusted input,
	// never holds what it does not need.
	Master bool
	// Set (required) checks s and stores its value. Its error names s.From, for
	// which Setting's Invalid methods word the message.
	Set func(s Setting) error
}

// Name is the option's flag, or its first variable when it has no flag.
func (o Option) Name() string {
	if o.Flag == "" {
		return o.Env[0]
	}
	return o.Flag
}

// Lookup returns the first of o's variables that is set and not blank (or,
// with KeepEmpty, set at all), as a Setting.
func (o Option) Lookup(lookupEnv func(string) (string, bool)) (Setting, bool) {
	for _, name := range o.Env {
		if v, set := lookupEnv(name); set && (strings.TrimSpace(v) != "" || o.KeepEmpty) {
			return Setting{Raw: v, From: name}, true
		}
	}
	return Setting{}, false
}

// pick returns the setting o takes: the flag if given, else its variable.
func (o Option) pick(flag Flag, lookupEnv func(string) (string, bool)) (Setting, bool) {
	if flag.Given {
		return flag.Setting, true
	}
	return o.Lookup(lookupEnv)
}

// Setting is one value as the user supplied it.
type Setting struct {
	Raw    string // exactly as given; messages quote it
	From   string // "--port" or "PORT": the only culprit an error names
	Negate bool   // it came from a --no-* form of a switch
}

// Text is the value with surrounding white space removed: " 4" from a
// hand-edited env file means 4.
func (s Setting) Text() string { return strings.TrimSpace(s.Raw) }

// Lower is Text with the ASCII letters lowered; see LowerASCII.
func (s Setting) Lower() string { return LowerASCII(s.Text()) }

// Invalid returns the error `invalid FROM "RAW": want WANT`.
func (s Setting) Invalid(want string) error {
	return fmt.Errorf("invalid %s %q: want %s", s.From, s.Raw, want)
}

// InvalidSecret is Invalid for a value that must never be echoed.
func (s Setting) InvalidSecret(want string) error {
	return fmt.Errorf("invalid %s (value not shown): want %s", s.From, want)
}

// InvalidURL is Invalid for a URL that may carry a password: it is masked.
func (s Setting) InvalidURL(want string) error {
	return fmt.Errorf("invalid %s %q: want %s", s.From, Redact(s.Raw), want)
}

// Whole parses a whole number in [lo, hi]. Only digits are accepted, so
// "+4", "4x", "0x10" and "" are all errors.
func (s Setting) Whole(lo, hi int, want string) (int, error) {
	t := s.Text()
	if t == "" || strings.TrimLeft(t, "0123456789") != "" {
		return 0, s.Invalid(want)
	}
	n, err := strconv.ParseUint(t, 10, 63)
	if err != nil || n < uint64(lo) || n > uint64(hi) {
		return 0, s.Invalid(want)
	}
	return int(n), nil
}

// Bool parses true/false, 1/0, yes/no or on/off in any ASCII case; the
// --no-* form of a switch inverts it.
func (s Setting) Bool() (bool, error) {
	var b bool
	switch s.Lower() {
	case "true", "1", "yes", "on":
		b = true
	case "false", "0", "no", "off":
	default:
		return false, s.Invalid("true or false (or 1/0, yes/no, on/off)")
	}
	return b != s.Negate, nil
}

// Duration parses a Go duration ("1m30s") or a number of seconds ("75",
// "0.5", as uvicorn takes them) that is at least lo; atLeast words lo
// for the message.
func (s Setting) Duration(lo time.Duration, atLeast string) (time.Duration, error) {
	t := s.Text()
	d, ok := parseDuration(t)
	if !ok || d < lo {
		return 0, s.Invalid("a duration like 1m30s, 250ms or 75 (seconds), " + atLeast)
	}
	// 0 means "off" or "at once" for several settings, so a typo such as
	// 0.0000000001 must not quietly become it. No unit holds a digit, so
	// any non-zero digit means a non-zero duration.
	if d == 0 && strings.ContainsAny(t, "123456789") {
		return 0, s.Invalid("0 or at least 1ns (a shorter duration would become 0)")
	}
	return d, nil
}

// Size parses a byte count, a number with an optional unit (KB is 1000
// bytes, KiB 1024), any case, spaces allowed before the unit.
func (s Setting) Size() (int, bool) { return parseSize(s.Text()) }

// parseDuration parses a Go duration or a decimal number of seconds and
// drops any fraction of a nanosecond. Dropping rather than rounding means
// that d < lo holds exactly when the value written is below lo, for any
// whole-nanosecond lo.
func parseDuration(t string) (time.Duration, bool) {
	if isDecimal(t) {
		// Done in integers: a float64 rounds 0.09999999999 s up to 100ms.
		whole, frac, _ := strings.Cut(t, ".")
		sec, err := strconv.ParseInt("0"+whole, 10, 64)
		ns, _ := strconv.ParseInt((frac + "000000000")[:9], 10, 64)
		if err != nil || sec > (math.MaxInt64-ns)/int64(time.Second) {
			return 0, false
		}
		return time.Duration(sec)*time.Second + time.Duration(ns), true
	}
	d, err := time.ParseDuration(t)
	if err != nil || d < 0 {
		return 0, false
	}
	return d, true
}

// isDecimal reports whether t is digits with at most one decimal point,
// which keeps ParseFloat's "1e3", "inf" and "0x1p4" out.
func isDecimal(t string) bool {
	digits, dots := 0, 0
	for _, r := range t {
		switch {
		case r >= '0' && r <= '9':
			digits++
		case r == '.':
			dots++
		default:
			return false
		}
	}
	return digits > 0 && dots <= 1
}

var sizeUnits = map[string]float64{
	"": 1, "b": 1,
	"kb": 1e3, "kib": 1 << 10,
	"mb": 1e6, "mib": 1 << 20,
	"gb": 1e9, "gib": 1 << 30,
}

func parseSize(t string) (int, bool) {
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	mult, ok := sizeUnits[LowerASCII(strings.TrimSpace(t[i:]))]
	if !ok || !isDecimal(t[:i]) {
		return 0, false
	}
	f, err := strconv.ParseFloat(t[:i], 64)
	n := math.Floor(f * mult)
	if err != nil || n > math.MaxInt32 {
		return 0, false
	}
	return int(n), true
}

// FormatDuration shows a default as usage does: whole seconds as "75s",
// anything else in Go's form ("250ms").
func FormatDuration(d time.Duration) string {
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return d.String()
}

// parseHost accepts an IP address (an IPv6 one with or without brackets)
// or a DNS host name, and returns it without brackets.
func parseHost(t string) (string, bool) {
	if strings.HasPrefix(t, "[") && strings.HasSuffix(t, "]") {
		a, err := netip.ParseAddr(t[1 : len(t)-1])
		return a.String(), err == nil && a.Is6()
	}
	if _, err := netip.ParseAddr(t); err == nil {
		return t, true
	}
	if t == "" || len(t) > 253 {
		return "", false
	}
	labels := strings.Split(strings.TrimSuffix(t, "."), ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return "", false
		}
		for _, r := range l {
			// Underscores are not DNS but container and compose service
			// names use them and resolvers accept them.
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return "", false
			}
		}
	}
	// An all-digit last label is a mistyped IPv4 address such as
	// 10.0.0.300, never a host name (RFC 3696 section 2).
	if strings.TrimLeft(labels[len(labels)-1], "0123456789") == "" {
		return "", false
	}
	return t, true
}

// secretParam matches query or key=value parameters that carry secrets.
var secretParam = regexp.MustCompile(`(?i)(password|passwd|secret|token|api[-_]?key|key)=[^&\s]*`)

// Redact masks the user information of a URL and secret-looking
// parameters, so that a message about a bad URL does not leak its
// password. It masks up to the last "@" because a password may itself
// hold "/" or "?".
func Redact(s string) string {
	if i := strings.Index(s, "://"); i >= 0 {
		if at := strings.LastIndex(s[i+3:], "@"); at >= 0 {
			s = s[:i+3] + "xxxxx" + s[i+3+at:]
		}
	}
	return secretParam.ReplaceAllString(s, "${1}=xxxxx")
}

// LowerASCII lowers the letters A to Z and nothing else. Names are matched
// with it rather than strings.ToLower, which maps the Turkish İ to i and
// the Kelvin sign to k, so that "İNFO" would pass for "info".
func LowerASCII(t string) string {
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + 'a' - 'A'
		}
		return r
	}, t)
}

// IsVisibleASCII reports whether t is non-empty and only printable ASCII
// other than space: what an Authorization header value can carry.
func IsVisibleASCII(t string) bool {
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] > '~' {
			return false
		}
	}
	return t != ""
}

// Flag holds the last value given on the command line for one option; a
// switch and its --no-* form share one Flag, so the later one wins.
type Flag struct {
	Setting
	Given bool
}

// On returns the value of a switch, false if it was not given.
func (f Flag) On() (bool, error) {
	if !f.Given {
		return false, nil
	}
	return f.Bool()
}

// flagValue is the pflag.Value of one flag name. Set only records: every
// check happens in the option's Set, which words the errors itself.
type flagValue struct {
	flag     *Flag
	name     string
	negate   bool
	isSwitch bool
	repeat   bool
}

func (v *flagValue) Set(raw string) error {
	if v.repeat && v.flag.Given {
		raw = v.flag.Raw + "," + raw
	}
	*v.flag = Flag{Setting: Setting{Raw: raw, From: "--" + v.name, Negate: v.negate}, Given: true}
	return nil
}

func (v *flagValue) String() string { return "" }

func (v *flagValue) Type() string {
	if v.isSwitch {
		return "bool"
	}
	return "string"
}

// AddFlag defines --name on fs, recording into f: a switch (alone means
// true) or a flag with a value. Programs use it for the flags of their
// subcommands, so that those read values as the options do.
func AddFlag(fs *pflag.FlagSet, f *Flag, name string, isSwitch bool) {
	addFlag(fs, f, name, false, isSwitch, false)
}

func addFlag(fs *pflag.FlagSet, f *Flag, name string, negate, isSwitch, repeat bool) {
	pf := fs.VarPF(&flagValue{flag: f, name: name, negate: negate, isSwitch: isSwitch, repeat: repeat}, name, "", "")
	if isSwitch {
		pf.NoOptDefVal = "true"
	}
}

// ErrHelp is returned by Load for -h and --help.
var ErrHelp = pflag.ErrHelp

// UsageError is a command line that does not parse: an unknown flag, a
// missing flag value or a positional argument. Main prints usage after it.
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

// IsUsageError reports whether err is about the shape of the command line
// rather than a value, so that the caller should print usage after it.
func IsUsageError(err error) bool {
	var u UsageError
	return errors.As(err, &u)
}

// OneLine returns err with its message kept on one line: pflag quotes an
// unknown flag raw, control characters included.
func OneLine(err error) error { return oneLine{err} }

type oneLine struct{ err error }

func (e oneLine) Error() string {
	return strings.NewReplacer("\n", `\n`, "\r", `\r`).Replace(strings.TrimRight(e.err.Error(), "\n"))
}

func (e oneLine) Unwrap() error { return e.err }

// parse reads args into one Flag per option (nil entries are skipped) and
// the --version switch.
func parse(name string, args []string, opts []Option) ([]Flag, Flag, error) {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.SortFlags = false
	flags := make([]Flag, len(opts))
	for i, o := range opts {
		if o.Flag != "" {
			addFlag(fs, &flags[i], o.Flag, false, o.Arg == "", o.Repeat)
		}
		if o.NegFlag != "" {
			addFlag(fs, &flags[i], o.NegFlag, true, true, false)
		}
	}
	var version Flag
	addFlag(fs, &version, "version", false, true, false)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, Flag{}, ErrHelp
		}
		var ne *pflag.NotExistError
		if errors.As(err, &ne) {
			// A secret that has no flag: say where it goes instead.
			for _, o := range opts {
				if o.Flag == "" && strings.ToLower(strings.ReplaceAll(o.Env[0], "_", "-")) == ne.GetSpecifiedName() {
					err = fmt.Errorf("%w (set %s in the environment instead: a command line shows in ps)", err, o.Env[0])
					break
				}
			}
			if !strings.Contains(err.Error(), "(set ") {
				if near := nearestFlag(ne.GetSpecifiedName(), opts); near != "" {
					err = fmt.Errorf("%w (did you mean --%s?)", err, near)
				}
			}
		}
		return nil, Flag{}, UsageError{oneLine{err}}
	}
	if rest := fs.Args(); len(rest) > 0 {
		// "--reload false": a switch takes no separate value.
		if i := slices.Index(args, rest[0]); i > 0 && isSwitchWord(rest[0]) && strings.HasPrefix(args[i-1], "--") {
			if f := fs.Lookup(strings.TrimPrefix(args[i-1], "--")); f != nil && f.NoOptDefVal != "" {
				return nil, Flag{}, UsageError{fmt.Errorf("unexpected argument %q: a switch takes its value after =, as in %s=%s", rest[0], args[i-1], rest[0])}
			}
		}
		return nil, Flag{}, UsageError{fmt.Errorf("unexpected argument %q: %s takes flags only", rest[0], name)}
	}
	return flags, version, nil
}

// usageWidth is the width --help keeps within.
const usageWidth = 100

// Wrap breaks text into lines of at most width columns, at spaces; a
// longer word gets a line of its own. It returns at least one line.
func Wrap(text string, width int) []string {
	var lines []string
	cur := ""
	for _, word := range strings.Fields(text) {
		switch {
		case cur == "":
			cur = word
		case len(cur)+1+len(word) <= width:
			cur += " " + word
		default:
			lines = append(lines, cur)
			cur = word
		}
	}
	if cur != "" || len(lines) == 0 {
		lines = append(lines, cur)
	}
	return lines
}

// isSwitchWord reports whether s is a value a switch takes.
func isSwitchWord(s string) bool {
	switch strings.ToLower(s) {
	case "true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n":
		return true
	}
	return false
}

// nearestFlag returns the flag name (without --) closest to name, if it is
// at most two edits away, or "".
func nearestFlag(name string, opts []Option) string {
	if len(name) < 3 {
		return ""
	}
	best, bestD := "", 3
	consider := func(f string) {
		if f == "" {
			return
		}
		if d := editDistance(name, f); d < bestD {
			best, bestD = f, d
		}
	}
	for _, o := range opts {
		consider(o.Flag)
		consider(o.NegFlag)
	}
	consider("help")
	consider("version")
	return best
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// Usage groups of the process model, in the order usage prints them; an
// application's own groups come after Reload and before Operations.
const (
	GroupProcess = "Process model"
	GroupHTTP    = "HTTP"
	GroupTLS     = "HTTPS (TLS)"
	GroupReload  = "Reload (development)"
	GroupOps     = "Operations"
)

// writeUsage writes the --help text: head, one line per flag with its
// variable and default, grouped, then foot.
func writeUsage(w io.Writer, head, foot string, opts []Option) {
	type row struct{ flag, env, def, help string }
	var rows []row
	groups := []string{GroupProcess, GroupHTTP, GroupTLS, GroupReload}
	byGroup := map[string][]row{}
	add := func(group string, r row) {
		if !slices.Contains(groups, group) && group != GroupOps {
			groups = append(groups, group)
		}
		byGroup[group] = append(byGroup[group], r)
		rows = append(rows, r)
	}
	for _, o := range opts {
		f := "(no flag)"
		if o.Flag != "" {
			f = strings.TrimSpace("--" + o.Flag + " " + o.Arg)
		}
		add(o.Group, row{f, strings.Join(o.Env, ", "), o.Default, o.Help})
		if o.NegFlag != "" {
			add(o.Group, row{"--" + o.NegFlag, "", "", "same as --" + o.Flag + "=false"})
		}
	}
	groups = append(groups, GroupOps)
	add("Other", row{"-h, --help", "", "", "print this help and exit"})
	add("Other", row{"--version", "", "", "print the version and exit"})

	wf, we, wd := len("FLAG"), len("VARIABLE"), len("DEFAULT")
	for _, r := range rows {
		wf, we, wd = max(wf, len(r.flag)), max(we, len(r.env)), max(wd, len(r.def))
	}
	// One line with the flag, its variables and its default, then the
	// meaning below it, wrapped, so that the usage fits in usageWidth
	// columns.
	line := func(r row) {
		first := strings.TrimRight(fmt.Sprintf("  %-*s  %-*s  %s", wf, r.flag, we, r.env, r.def), " ")
		if len(first) > usageWidth {
			// A long default gets a line of its own.
			fmt.Fprintln(w, strings.TrimRight(fmt.Sprintf("  %-*s  %s", wf, r.flag, r.env), " "))
			first = "      default: " + r.def
		}
		fmt.Fprintln(w, first)
		for _, l := range Wrap(r.help, usageWidth-6) {
			fmt.Fprintln(w, "      "+l)
		}
	}
	fmt.Fprint(w, head)
	line(row{"FLAG", "VARIABLE", "DEFAULT", "MEANING"})
	for _, g := range groups {
		if len(byGroup[g]) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s:\n", g)
		for _, r := range byGroup[g] {
			line(r)
		}
	}
	fmt.Fprint(w, foot)
}

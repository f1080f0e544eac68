import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

/**
 * pixelmed's DicomSRValidator on many files in one JVM (dicom_io/testing/validate.py runs it).
 *
 * <p>In: one path per line on stdin. Out, for each: what `DicomSRValidator path` prints (the same
 * options as its main), or the stack trace of what it threw, then a line holding args[0] alone. One
 * validator serves every file: its output is the same as a fresh one's. Ends at the end of stdin.
 */
public final class PixelmedSrValidator {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
        System.setOut(out);
        System.setErr(out);
        DicomSRValidator validator = new DicomSRValidator();
        String path;
        while ((path = in.readLine()) != null) {
            try {
                out.print(validator.validate(path, false, true, false, false, false));
            } catch (Exception e) {
                e.printStackTrace(out);
            }
            out.println();
            out.println(args[0]);
            out.flush();
        }
    }
}
